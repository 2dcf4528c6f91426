"""The daemon's signals: SIGTERM and SIGINT stop it (a second SIGINT exits at once), and
SIGHUP re-reads the config files, one re-read at a time.

A re-read may wait for a file's writer to finish (``FileLayerWatcher.reload``), so it runs
on a worker thread; SIGHUPs that come meanwhile make one more re-read after it, not one
thread each.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def install(stop: Callable[[], None], hangup: Callable[[], None], log: Any) -> None:
    """On the running loop: SIGTERM and SIGINT call ``stop`` (a second SIGINT exits with
    130 at once), SIGHUP calls ``hangup``. Not on the main thread (a daemon run in a thread,
    in tests): no signals."""
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            log.warning("forced_exit")
            os._exit(130)
        stop()

    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        loop.add_signal_handler(signal.SIGHUP, hangup)
    except (RuntimeError, ValueError):
        pass


def remove() -> None:
    loop = asyncio.get_running_loop()
    for sig in _HANDLED:
        try:
            loop.remove_signal_handler(sig)
        except (RuntimeError, ValueError):
            pass


class Rereads:
    """SIGHUP's re-reads of the config files, on the loop: ``reread`` runs on a worker
    thread, and must call ``done`` (on the loop) when it ends; a request that comes while
    one runs makes one more after it, unless ``stopping`` is set by then."""

    def __init__(self, reread: Callable[[], None], stopping: asyncio.Event) -> None:
        self._reread = reread
        self._stopping = stopping
        self._running = False
        self._again = False

    @property
    def running(self) -> bool:
        """Whether a re-read runs (or one more is due after it)."""
        return self._running

    def request(self) -> None:
        if self._running:
            self._again = True
            return
        self._running = True
        self._start()

    def done(self) -> None:
        if self._again and not self._stopping.is_set():
            self._again = False
            self._start()
        else:
            self._running = self._again = False

    def _start(self) -> None:
        asyncio.get_running_loop().run_in_executor(None, self._reread)
