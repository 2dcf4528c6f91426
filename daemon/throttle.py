"""Run a function at most every so often on the event loop; calls in between coalesce."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Throttle:
    """``throttle()`` runs ``fn`` now if it last ran ``every`` seconds ago or more, else once
    when that time is up, however many calls came in between.

    The caller keeps the newest state to act on; ``fn`` reads it. So a lone event is
    handled at once, and a burst costs one run per ``every``. Loop thread only.
    """

    def __init__(self, every: float, fn: Callable[[], None]):
        self.every = every
        self._fn = fn
        self._timer: asyncio.TimerHandle | None = None
        self._ran_at = float("-inf")

    def __call__(self) -> None:
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._ran_at + self.every - loop.time()
        if wait <= 0:
            self._run()
        else:
            self._timer = loop.call_later(wait, self._run)

    def _run(self) -> None:
        self._timer = None
        self._ran_at = asyncio.get_running_loop().time()
        self._fn()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
