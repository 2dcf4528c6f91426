"""A lone etcd change's work after its push, run a little later: its *tail*.

The etcd watch thread pushes a change that comes alone itself
(``EtcdIntake._take_inline``) and the engine holds the rest of its work (the etcd layer
and snapshot, the saved state, ``change_accepted``: ``Engine.finish``) so that the
clients apply the change first on these CPUs (docs/performance-history.md, twenty-first
round). ``HeldTail`` runs that tail ``TAIL_AFTER_S`` later and keeps the order a reader
of the log expects:

- **when**: on the loop when an ``Alarm`` goes off (a timerfd the watch thread arms
  without waking anything, and goes back to etcd); where there is none (not Linux),
  on the watch thread after a sleep. Any other call into the engine runs the tail
  first, so a held tail never waits behind the next change.
- **what waits for it**: what clients send (acks, reports, a client gone) while a tail
  is held is handled after it, in order (``first``): no version is acknowledged before
  it was accepted.

The engine and the push state are used under the daemon's lock: ``finish`` takes it,
and so waits for a tail another thread is running; ``later`` (the arming) is called
with it held.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from .alarm import Alarm
from .engine import Engine

# How long after pushing a lone change the rest of its work waits (the layer, the
# snapshot, the save, ``change_accepted``): longer than a client takes to apply it,
# here ~0.3 ms at p50 (docs/performance-history.md, twenty-first round).
TAIL_AFTER_S = 0.0015

Dispatch = Callable[[Callable[..., None], tuple[Any, ...]], None]


class HeldTail:
    """``engine()`` gives the daemon's engine (None before the start); ``lock`` is the
    daemon's; ``dispatch(fn, args)`` runs a handler, logging what it raises; ``log`` is
    the daemon's logger."""

    def __init__(
        self,
        engine: Callable[[], Engine | None],
        lock: threading.RLock,
        dispatch: Dispatch,
        log: Any,
    ) -> None:
        self._engine = engine
        self._lock = lock
        self._dispatch = dispatch
        self._alarm: Alarm | None = None  # made at ``open``, closed at ``close``: under ``_lock``
        # What clients sent while a tail was held, and the timer that hands it over.
        self._waiting: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.log = log

    # --- the loop's side ----------------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop, at the start: the alarm, if this system has one."""
        alarm = Alarm.create()
        if alarm is None:
            return
        loop.add_reader(alarm.fileno(), self._on_alarm)
        with self._lock:
            self._alarm = alarm

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop, at the stop, once no lone change comes any more."""
        with self._lock:
            alarm, self._alarm = self._alarm, None
        if alarm is not None:
            loop.remove_reader(alarm.fileno())
            alarm.close()

    def first(self, handler: Callable[..., None], *, wait: bool = True) -> Callable[..., None]:
        """``handler`` for what a client sends, run after a held tail: a client's ack
        of a version never comes before that version's ``change_accepted``.

        While a tail is held, what clients send waits, in order, until the tail runs
        (``TAIL_AFTER_S`` after the first of it at the latest): handled at once, the ack
        of the change would run the tail on the loop just as the client that sent it
        returns from ``apply``, on these CPUs. Without ``wait`` (a client gone: the
        server has checked that no other connection has its name, and one may take it
        at once), the tail and what waits run now, then ``handler``. On the loop."""

        @functools.wraps(handler)
        def handle(*args: Any) -> None:
            engine = self._engine()
            if not self._waiting and (engine is None or not engine.holds_tail):
                handler(*args)
                return
            if not wait:
                self.flush()
                handler(*args)
                return
            self._waiting.append((handler, args))
            if self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(TAIL_AFTER_S, self.flush)

        return handle

    def flush(self) -> None:
        """On the loop: run a held tail, then what clients sent meanwhile, in order."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.finish()
        waiting, self._waiting = self._waiting, []
        for handler, args in waiting:
            self._dispatch(handler, args)

    def _on_alarm(self) -> None:
        if self._alarm is not None:
            self._alarm.clear()
        self.flush()

    # --- the watch thread's side ----------------------------------------------------------------

    def later(self) -> bool:
        """Just after the engine pushed a lone change (under ``_lock``): True if the tail
        will run later without this thread (none held, or the alarm armed); False if the
        caller must ``wait_and_finish`` once it has released the lock."""
        engine = self._engine()
        if engine is None or not engine.holds_tail:
            return True
        alarm = self._alarm
        if alarm is None:
            return False
        try:
            alarm.arm(TAIL_AFTER_S)
        except OSError as exc:
            self.log.error("alarm_failed", error=str(exc))
            return False
        return True

    def wait_and_finish(self) -> None:
        """Without an alarm, on the watch thread, not under ``_lock`` (the loop goes on
        meanwhile): wait ``TAIL_AFTER_S``, then run the tail."""
        time.sleep(TAIL_AFTER_S)
        self.finish()

    # --- either ------------------------------------------------------------------------------

    def finish(self) -> None:
        """Run a held tail, if the engine holds one: when this returns, no thread is
        running it."""
        engine = self._engine()
        if engine is not None and engine.holds_tail:
            with self._lock:  # another thread may be running it: wait for that
                if engine.holds_tail:
                    self._dispatch(engine.finish, ())
