"""Run a function at most every so often on the event loop; calls in between coalesce.
And log a kind of line at most so often, counting the rest (``LogLimit``), or a failure
that every try repeats once, counting the tries (``Repeats``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable


class Throttle:
    """``throttle()`` runs ``fn`` now if it last ran ``every`` seconds ago or more, else once
    when that time is up, however many calls came in between.

    The caller keeps the newest state to act on; ``fn`` reads it. So a lone event is
    handled at once, and a burst costs one run per ``every``. Loop thread only, but for
    ``idle`` and ``ran``: a caller that ran ``fn`` itself on another thread (serialized
    with the loop by its own lock) checks ``idle()`` first and then calls ``ran()``.
    """

    def __init__(self, every: float, fn: Callable[[], None]):
        self.every = every
        self._fn = fn
        self._timer: asyncio.TimerHandle | None = None
        self._ran_at = float("-inf")

    def __call__(self) -> None:
        if self._timer is not None:
            return
        wait = self._ran_at + self.every - time.monotonic()
        if wait <= 0:
            self._run()
        else:
            self._timer = asyncio.get_running_loop().call_later(wait, self._run)

    def idle(self) -> bool:
        """Whether a call now would run ``fn`` at once (no run due, none in the last ``every``)."""
        return self._timer is None and time.monotonic() - self._ran_at >= self.every

    def ran(self) -> None:
        """``fn``'s work was just done by the caller: the next run waits ``every`` from now."""
        self._ran_at = time.monotonic()

    def _run(self) -> None:
        self._timer = None
        self._ran_at = time.monotonic()
        self._fn()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class LogLimit:
    """At most ``most`` lines of a kind per ``every`` seconds; the rest are counted, and the
    count is said by ``summary(count)`` once that window is up (or at ``flush``).

    For lines a peer causes at will: a client that reconnects in a loop, sending junk,
    brings one line per connection, which unbounded would fill the disk and bury every
    other line. Loop thread only; ``flush`` at the end, so that no timer outlives it."""

    def __init__(self, every: float, most: int, summary: Callable[[int], None]):
        self.every = every
        self.most = most
        self._summary = summary
        self._window_end = float("-inf")
        self._in_window = 0
        self._held = 0
        self._timer: asyncio.TimerHandle | None = None

    def allow(self) -> bool:
        """Whether to log this line now; False: it is counted for the summary."""
        now = time.monotonic()
        if now >= self._window_end:
            self._window_end = now + self.every
            self._in_window = 0
        self._in_window += 1
        if self._in_window <= self.most:
            return True
        self._held += 1
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._window_end - now, self.flush)
        return False

    def flush(self) -> None:
        """Say the lines not logged since the last summary, if any, now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, 0
        if held:
            self._summary(held)


class Repeats:
    """When to log a failure that each try repeats (a state dir that cannot be written,
    where each change tries again): when it starts, when its reason changes, and at most
    every ``every`` seconds while it lasts; the tries in between are counted, and said in
    the next line (``not_logged``), or in the one that says it ended (``succeeded``).

    Any thread, no timer: the tries come from several threads, and a failure no try
    repeats has nothing new to say."""

    def __init__(self, every: float):
        self.every = every
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._failures = 0
        self._not_logged = 0
        self._logged_at = float("-inf")

    def failed(self, reason: str, *, say: bool = False) -> dict[str, int] | None:
        """A try failed for ``reason``: the counts to log it with (``failures`` since it
        started, ``not_logged`` since the line before), or None if it is only counted.
        ``say``: log it whatever the time (a last try, whose line no later one follows)."""
        with self._lock:
            self._failures += 1
            now = time.monotonic()
            if not say and reason == self._reason and now - self._logged_at < self.every:
                self._not_logged += 1
                return None
            counts = {"failures": self._failures, "not_logged": self._not_logged}
            self._reason, self._logged_at, self._not_logged = reason, now, 0
            return counts

    def succeeded(self) -> dict[str, int] | None:
        """A try succeeded: the counts of the failure it ends, to log that with, or None if
        none was going on."""
        with self._lock:
            if self._reason is None:
                return None
            counts = {"failures": self._failures, "not_logged": self._not_logged}
            self._reason, self._logged_at = None, float("-inf")
            self._failures = self._not_logged = 0
            return counts
