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
the newest ``report``, as it is (a loop may count from below 0). JSON has no NaN or
infinity, so non-finite values travel as the strings ``"nan"``, ``"inf"`` and
``"-inf"`` (see ``encode_value``/``decode_value``).
"""

from __future__ import annotations

import logging
import math
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


encode_value = protocol.encode_number
decode_value = protocol.decode_number


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
        self._step: int | None = None  # None: nothing reported yet
        self._reports = 0
        self._taken = 0
        self._bad: set[str] = set()
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
                if len(buffers) >= MAX_METRICS:
                    continue
                buf = buffers[name] = []
                self.start()  # a new metric is rare: the only place that may start the thread
            buf.append(value)
        self._reports += 1

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

    def flush(self) -> bool:
        """Send one message now if anything was reported since the last; True if one was sent."""
        message = self.take()
        if message is None:
            return False
        self._send(message)
        return True

    def take(self) -> dict[str, Any] | None:
        """The ``metrics`` message for what was reported since the last take, or ``None``."""
        with self._take_lock:
            return self._take()

    def _take(self) -> dict[str, Any] | None:
        reports = self._reports
        if reports == self._taken:
            return None
        self._taken = reports
        step = self._step
        if step is None:
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
