"""structlog set-up: JSON lines when stderr is not a terminal, readable console output when it is.

Events are stable snake_case names (``change_accepted``, ``change_rejected``,
``update_shadowed``, ``etcd_reconnected``) with bound context. Secrets never
reach a log line: values of keys the schema marks secret are masked before
they are logged, by the caller, and fields named like a credential
(``password``, ``token``, ``secret``) are masked here.

The daemon logs one line per accepted change, so a burst of thousands of etcd
revisions a second is thousands of lines: the chain is kept short (the check of
field names is cached per name, the time stamp's date and time are formatted once a
second, and each line is one ``write``).
"""

from __future__ import annotations

import atexit
import functools
import json as _json
import logging
import math
import os
import select
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SENSITIVE = ("password", "token", "secret")
MASK = "**********"


@functools.lru_cache(maxsize=4096)
def _is_sensitive(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SENSITIVE)


def _drop_sensitive(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in event:
        if _is_sensitive(name):
            event[name] = MASK
    return event


# One encoder for every line (``json.dumps`` with options builds a new one per call);
# what JSON cannot carry is logged as its ``repr``.
_ENCODER = _json.JSONEncoder(default=repr, allow_nan=False)


def _dumps(event: Any, **_: Any) -> str:
    try:
        return _ENCODER.encode(event)
    except ValueError:
        # A number JSON has no text for (a refused ``1e999`` read as infinity): written
        # as ``Infinity`` it would make the line no JSON for a log collector.
        try:
            return _ENCODER.encode(_finite(event))
        except (ValueError, RecursionError):
            return _ENCODER.encode({"event": "log_line_unwritable", "line": repr(event)})


def _finite(value: Any) -> Any:
    """``value`` with each float that is not finite as its text (``'inf'``, ``'nan'``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


_stamp_cache: tuple[int, str] = (-1, "")  # (the second, its date and time formatted)


def _stamp_utc(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``timestamp``: UTC in ISO 8601 with microseconds and ``Z``, as structlog's
    ``TimeStamper(fmt="iso", utc=True)`` writes it, with the date and time formatted once a
    second instead of a ``datetime`` per line: 0.7 µs a line instead of 1.6."""
    global _stamp_cache
    now = time.time()
    second = int(now)
    cached = _stamp_cache
    if cached[0] != second:
        cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        _stamp_cache = cached  # one tuple swapped whole: safe across threads
    event["timestamp"] = f"{cached[1]}.{int((now - second) * 1_000_000):06d}Z"
    return event


class _Sink:
    """Where the lines are written: a write that fails is dropped, never raised.

    A log line is written from wherever the event happened (a client's callback, a
    watch thread, the stop itself). The reader of a pipe gone (a log collector that
    died, ``hotknob run 2>&1 | head``), or a full disk under a log file, would
    otherwise raise there: the daemon would stop, halfway and without a word (its
    final state not saved), because nobody reads its log."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def write(self, text: str) -> int:
        try:
            return self._out.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed
            return 0

    def flush(self) -> None:
        try:
            self._out.flush()
        except (OSError, ValueError):
            pass


HELD_LINES = 10_000
"""The most lines held for an output that does not take them (``_HeldSink``); past that a
line is dropped and counted."""

DRAIN_AT_EXIT_S = 2.0
"""How long the process waits at its exit for the lines held to be written: a stop is not
held longer than this by an output nobody reads."""


class _HeldSink(_Sink):
    """For a pipe, a socket or a terminal: lines written by a thread of their own.

    A write there blocks while its reader does not read (a log collector that stalled, a
    FIFO nobody opened for reading, a terminal stopped with Ctrl-S). Lines are logged by
    the etcd watch thread and the event loop, under the lock of the engine: with a
    blocking write there, changes stopped reaching the processes, and a SIGTERM could not
    stop the daemon. Here a line is handed over and the caller goes on; past
    ``HELD_LINES`` held, lines are dropped and counted, and once the output takes lines
    again a ``log_lines_dropped`` line says how many. The writer writes to the file
    descriptor itself, not through ``sys.stderr``, so that no lock of that stream is held
    while it waits (the exit flushes that stream)."""

    def __init__(self, out: TextIO, fd: int) -> None:
        super().__init__(out)
        self._fd = fd
        self._encoding = getattr(out, "encoding", None) or "utf-8"
        self._lines: deque[str] = deque()
        self._wake = threading.Event()
        self._busy = False
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        writer = threading.Thread(target=self._run, name="hotknob-log-writer", daemon=True)
        writer.start()
        self._writer_id = writer.ident

    def write(self, text: str) -> int:
        lines = self._lines
        # The writer's own ``log_lines_dropped`` goes past the limit: dropped itself, it was
        # counted as one more drop, and the next report said 1 for hundreds lost.
        if len(lines) >= HELD_LINES and threading.get_ident() != self._writer_id:
            with self._dropped_lock:
                self._dropped += 1
            return 0
        lines.append(text)
        # After the append: the writer clears the event before it takes what is held.
        if not self._wake.is_set():
            self._wake.set()
        return len(text)

    def flush(self) -> None:
        pass

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for what is held to be written; whether it was."""
        deadline = time.monotonic() + timeout
        while self._lines or self._busy:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _run(self) -> None:
        lines = self._lines
        while True:
            self._wake.wait()
            self._busy = True
            self._wake.clear()
            try:
                while lines:
                    batch = [lines.popleft() for _ in range(min(len(lines), 512))]
                    self._put("".join(batch))
                    if self._dropped:
                        with self._dropped_lock:
                            count, self._dropped = self._dropped, 0
                        get_logger().warning("log_lines_dropped", count=count, held=HELD_LINES)
            finally:
                self._busy = False

    def _put(self, text: str) -> None:
        data = memoryview(text.encode(self._encoding, "backslashreplace"))
        while data:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:  # the descriptor was made non-blocking by someone else
                select.select([], [self._fd], [], 1.0)
            except OSError:  # the reader gone, a full disk: dropped, as ``_Sink`` does
                return


_held_sinks: dict[int, _HeldSink] = {}  # by file descriptor: one writer each


def _sink_for(out: TextIO) -> _Sink:
    """``_HeldSink`` for an output whose write may block (a pipe, a socket, a terminal),
    else ``_Sink``: a regular file (a full disk fails at once), ``/dev/null``, a stream
    that is no file."""
    try:
        fd = out.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return _Sink(out)
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))):
        return _Sink(out)
    sink = _held_sinks.get(fd)
    if sink is None or sink._out is not out:
        if not _held_sinks:
            atexit.register(drain)
        sink = _held_sinks[fd] = _HeldSink(out, fd)
    return sink


def drain(timeout: float = DRAIN_AT_EXIT_S) -> None:
    """Wait, up to ``timeout`` s in all, for the log lines held for a slow output to be
    written (at the exit, and before the CLI's last line, which must come after them)."""
    deadline = time.monotonic() + timeout
    for sink in list(_held_sinks.values()):
        sink.drain(max(0.0, deadline - time.monotonic()))


def configure(*, json: bool | None = None, level: str = "info", file: TextIO | None = None) -> None:
    """Configure structlog for the process (the daemon and the CLI call this once).

    Lines go to ``file``, stderr by default (a benchmark that runs the engine in its
    own process writes them where they cost what they cost in the daemon, unseen)."""
    out = sys.stderr if file is None else file
    if out is None:  # no stderr at all (Python sets it to None when descriptor 2 is closed)
        out = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    sink = _sink_for(out)
    if json is None:
        json = not out.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if json
        # A plain traceback: with ``rich`` installed the default one prints each frame's
        # local variables, a secret's value among them.
        else structlog.dev.ConsoleRenderer(
            # NO_COLOR (no-color.org): set to anything but empty, no colours on a terminal.
            colors=out.isatty() and not os.environ.get("NO_COLOR"),
            exception_formatter=structlog.dev.plain_traceback,
        )
    )
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _stamp_utc,
            _drop_sensitive,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.WriteLoggerFactory(file=sink),  # type: ignore[arg-type]  # a file enough
        cache_logger_on_first_use=False,
    )
    # Library loggers (grpc, watchdog, asyncio) at warning and above, at ``level`` and above
    # where it is higher (``--log-level error`` drops a library's warning as it does ours):
    # the same lines, with the library's logger name, so that a log of JSON lines stays
    # one (watchdog warns at a stop that came while its emitter thread was ending). As
    # ``logging.basicConfig`` did: not where a program or a test runner set up logging
    # itself.
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _LibraryLines)]
    if root.handlers and not ours:
        return
    for old in ours:
        root.removeHandler(old)
    handler = _LibraryLines(sink)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
                _stamp_utc,
                _drop_sensitive,
                structlog.processors.format_exc_info,
            ],
        )
    )
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, threshold))


class _LibraryLines(logging.StreamHandler):
    """The handler ``configure`` puts on the root logger (so that a second call replaces
    it, and a handler of someone else's is left alone)."""


def get_logger(name: str = "hotknob", **bound: Any) -> Any:
    return structlog.get_logger(name).bind(**bound)
