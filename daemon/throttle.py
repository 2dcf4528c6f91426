"""Run a function at most every so often on the event loop; calls in between coalesce."""

from __future__ import annotations

import asyncio
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
