"""Per-process reporting: ``live.report(step, loss=...)`` every step, sent about once a second.

The training thread and the sending side share plain lists and never take a
lock or make a system call on the training thread:

* ``report(step, **metrics)`` stores ``step`` and appends each value to its
  metric's list. That is all it does (a few hundred nanoseconds).
* a small background thread wakes every ``report_every_s`` seconds. If
  anything was reported since its last look, it takes, for each metric, the
  values appended since then (at most the newest ``window`` of them, and ahead
  of those the first NaN or infinity among the older ones, so that a non-finite
  value always reaches the daemon's guards) and hands one ``metrics`` message
  to ``send`` (the client's outbox).

Taking values is ``n = len(buf); chunk = buf[n - k:n]; del buf[:n]``: each
step is one atomic list operation, so a value appended meanwhile lands after
index ``n`` and is taken next time; nothing is lost or sent twice.

On the wire (protocol 1, ``{"type":"metrics","step":S,"latest":{...},"window":{...}}``)
``latest`` holds only the metrics reported since the previous message, and
``window`` their values since then, oldest first. ``step`` is the step given to
the newest ``report`` (a loop may count from below 0), made an ``int`` on the
sending thread by ``step_number``: a numpy or torch integer, or a float with no
fraction, is one; anything else cannot be sent as a step, so what was reported
with it is dropped, with one warning. JSON has no NaN or infinity, so non-finite
values travel as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (see
``encode_value``/``decode_value``).

Limits, so that one message always fits the protocol's 1 MiB line: at most
``MAX_METRICS`` names per process and ``MAX_NAME_CHARS`` characters per name (a
name past either is dropped, with one warning for each of the two reasons), and at
most ``window + 1`` values per name per message. The worst case with the default
window (32): a 200-character name JSON-escapes to at most 1,202 bytes (a control
character is written ``\\u001f``), a value to at most 24 (``-1.7976931348623157e+308``),
so a name costs at most about 1,228 bytes in ``latest`` and 1,205 + 25 per value in
``window``: 256 names of 33 values come to about 834 KB. That holds up to
``FITTING_WINDOW`` (64) values; a reporter built with a larger window cuts each
window of an oversized message down to that many (keeping a NaN or infinity).
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
import os
import threading
from collections.abc import Callable
from typing import Any

from . import protocol

log = logging.getLogger("hotknob.model_runtime")

DEFAULT_REPORT_EVERY_S = 1.0
DEFAULT_WINDOW = 32
REPORT_EVERY_ENV = "HOTKNOB_REPORT_EVERY_S"
MAX_METRICS = 256
"""Metric names one process may report; the daemon keeps no more per process either."""
MAX_NAME_CHARS = 200
"""The longest metric name, in characters; the daemon refuses longer ones too."""
FITTING_WINDOW = 64
"""The most values per name for which ``MAX_METRICS`` names always fit one message."""


encode_value = protocol.encode_number
decode_value = protocol.decode_number


def step_number(step: Any) -> int:
    """``step`` as the ``int`` a message carries; ``TypeError``/``ValueError`` if it is none.

    Anything with ``__index__`` (a numpy or torch integer) is that integer, and a real
    number with no fraction (``5.0``, ``np.float32(5)``) is its value. A bool, a
    fraction, NaN, an infinity, a number past the protocol's 64-bit bound, or anything
    else (a string, a float tensor) is refused: the daemon would disconnect a client
    that sent it, and JSON cannot carry the others.
    """
    if isinstance(step, bool):
        raise TypeError("a step must be an integer, not a bool")
    try:
        number = operator.index(step)
    except TypeError:
        if not isinstance(step, numbers.Real):
            raise TypeError(f"a step must be an integer, not {type(step).__name__}") from None
        try:
            value = float(step)
        except (OverflowError, ValueError):  # a ``Fraction`` past a float's range
            bound = protocol.MAX_INT
            raise ValueError(f"a step must be within +-{bound}, not {step!r:.80}") from None
        if not value.is_integer():
            raise ValueError(f"a step must be a whole number, not {step!r}") from None
        number = int(value)
    if not -protocol.MAX_INT <= number <= protocol.MAX_INT:
        raise ValueError(f"a step must be within +-{protocol.MAX_INT}, not {number}")
    return number


def report_every_from_env(default: float = DEFAULT_REPORT_EVERY_S) -> float:
    """``$HOTKNOB_REPORT_EVERY_S`` if it is a positive number, else ``default``."""
    text = os.environ.get(REPORT_EVERY_ENV, "")
    try:
        value = float(text)
    except ValueError:
        return default
    return value if value > 0 and math.isfinite(value) else default


class MetricsReporter:
    """Collects ``report`` calls and sends them at most every ``report_every_s`` seconds.

    ``send`` gets one message dict and must not block (``LiveConfig`` queues it).
    The sending thread starts with the first metric reported (so a process that
    never reports runs no thread); ``stop`` sends what is left and joins it
    (idempotent), and no thread starts after it. Values should be Python numbers
    (``loss.item()``): they are converted with ``float()`` on the sending thread,
    and a value that cannot be converted is dropped with one warning per metric.
    After ``stop``, ``report`` keeps nothing.
    """

    def __init__(
        self,
        send: Callable[[dict[str, Any]], None],
        *,
        report_every_s: float | None = None,
        window: int = DEFAULT_WINDOW,
        name: str = "hotknob-reporter",
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.report_every_s = report_every_s or report_every_from_env()
        if not (self.report_every_s > 0 and math.isfinite(self.report_every_s)):
            raise ValueError("report_every_s must be a positive number of seconds")
        self.window = window
        self._send = send
        self._buffers: dict[str, list[Any]] = {}
        self._step: Any = None  # as given to the newest ``report``: converted when sent
        self._reports = 0
        self._taken = 0
        self._bad: set[str] = set()
        # Names refused by ``report`` (written only there, read by the sending thread,
        # which warns once per reason): how many times, and the latest such name.
        self._too_many = 0
        self._too_many_name = ""
        self._too_long = 0
        self._too_long_name = ""
        self._warned_names: set[str] = set()
        self._warned_step = False
        self._take_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._stopped = False

    def report(self, step: int, **metrics: Any) -> None:
        """Record ``metrics`` at ``step``; the hot path: no lock, no system call, no I/O."""
        self._step = step
        buffers = self._buffers
        for name, value in metrics.items():
            buf = buffers.get(name)
            if buf is None:
                # A new name is rare: the only place that checks limits or starts the thread.
                if len(buffers) >= MAX_METRICS or len(name) > MAX_NAME_CHARS or self._stopped:
                    self._refuse(name)
                    continue
                buf = buffers[name] = []
                self.start()
            buf.append(value)
        self._reports += 1

    def _refuse(self, name: str) -> None:
        """Count a name ``report`` does not keep; the sending thread warns about it."""
        if self._stopped:
            return
        if len(name) > MAX_NAME_CHARS:
            self._too_long += 1
            self._too_long_name = name
        else:
            self._too_many += 1
            self._too_many_name = name
        self.start()  # so that the warning is not held back until ``stop``

    def start(self) -> None:
        """Start the sending thread (idempotent; never after ``stop``)."""
        if not self._started and not self._stopped:
            self._started = True
            self._thread.start()

    def stop(self) -> None:
        """Send what was reported since the last message, then end the thread; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
        # Nothing is sent after this: drop the buffers so that a ``report`` still made
        # (through a reference kept to this method) finds no name and keeps nothing.
        self._buffers = {}

    def forked(self) -> None:
        """In a forked child (no thread sends there): stopped as ``stop`` leaves it, with
        nothing sent, so that a ``report`` made through a kept reference keeps nothing."""
        self._stopped = True
        self._take_lock = threading.Lock()  # a thread of the parent may have held it
        self._buffers = {}

    def flush(self) -> bool:
        """Send one message now if anything was reported since the last; True if one was sent."""
        message = self.take()
        if message is None:
            return False
        if self.window > FITTING_WINDOW:
            _fit_windows(message["window"])
        self._send(message)
        return True

    def take(self) -> dict[str, Any] | None:
        """The ``metrics`` message for what was reported since the last take, or ``None``."""
        with self._take_lock:
            return self._take()

    def _take(self) -> dict[str, Any] | None:
        self._warn_refused_names()
        reports = self._reports
        if reports == self._taken:
            return None
        self._taken = reports
        raw_step = self._step  # set by every ``report`` before it counts itself
        try:
            step = step_number(raw_step)
        except (TypeError, ValueError) as exc:
            # No step to send them with: the values go, or they would pile up.
            for buf in list(self._buffers.values()):
                del buf[: len(buf)]
            if not self._warned_step:
                self._warned_step = True
                log.warning(
                    "live_report_step_unusable step=%.80r error=%s: what is reported with such a "
                    "step is dropped; pass report() an integer step",
                    raw_step,
                    exc,
                )
            return None
        latest: dict[str, float | str] = {}
        window: dict[str, list[float | str]] = {}
        for name, buf in list(self._buffers.items()):
            end = len(buf)
            if end == 0:
                continue
            cut = max(0, end - self.window)
            chunk = buf[cut:end]
            older = buf[:cut]
            del buf[:end]
            values = self._convert(name, chunk)
            dropped = self._first_non_finite(older)
            if dropped is not None:
                values.insert(0, dropped)
            if values:
                window[name] = values
                latest[name] = values[-1]
        if not latest:
            return None
        return {"type": "metrics", "step": step, "latest": latest, "window": window}

    def _warn_refused_names(self) -> None:
        for reason, count, name, limit in (
            ("more_than_max_metrics", self._too_many, self._too_many_name, MAX_METRICS),
            ("name_too_long", self._too_long, self._too_long_name, MAX_NAME_CHARS),
        ):
            if count and reason not in self._warned_names:
                self._warned_names.add(reason)
                log.warning(
                    "live_metric_names_dropped reason=%s limit=%d dropped_so_far=%d name=%.80r: "
                    "such names are not reported (warned once)",
                    reason,
                    limit,
                    count,
                    name,
                )

    @staticmethod
    def _first_non_finite(values: list[Any]) -> str | None:
        """The first NaN or infinity among ``values`` (as sent), or None; others are skipped."""
        for raw in values:
            if isinstance(raw, bool):
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError, OverflowError):
                continue
            if not math.isfinite(value):
                encoded = encode_value(value)
                assert isinstance(encoded, str)
                return encoded
        return None

    def _convert(self, name: str, chunk: list[Any]) -> list[float | str]:
        out: list[float | str] = []
        for raw in chunk:
            try:
                if isinstance(raw, bool):
                    raise TypeError("a bool is not a metric")
                out.append(encode_value(float(raw)))
            except (TypeError, ValueError, OverflowError) as exc:
                if name not in self._bad:
                    self._bad.add(name)
                    log.warning("live_metric_dropped metric=%s error=%s", name, exc)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.report_every_s):
            try:
                self.flush()
            except Exception:  # the thread must outlive any surprise
                log.exception("live_report_failed")


def _fit_windows(window: dict[str, list[float | str]]) -> None:
    """Cut each of ``window``'s lists to its newest ``FITTING_WINDOW`` values if the message
    might not fit one line (only a reporter with a larger window gets here), keeping
    ahead of them the first NaN or infinity cut off, as ``_take`` does.

    The bound is linear in the number of values: about 2,433 bytes per name plus 25 per
    value, so ``MAX_METRICS * FITTING_WINDOW`` values in all fit however they are spread.
    """
    if sum(map(len, window.values())) <= FITTING_WINDOW * MAX_METRICS:
        return
    for name, values in window.items():
        if len(values) > FITTING_WINDOW:
            cut = len(values) - FITTING_WINDOW
            kept = values[cut:]
            first_bad = next((v for v in values[:cut] if isinstance(v, str)), None)
            if first_bad is not None:
                kept.insert(0, first_bad)
            window[name] = kept
