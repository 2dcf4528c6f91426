"""Saving states on a thread of the writer's own, so that no change waits for the disk.

``StateStore`` (``state.py``) writes a state when asked, on the caller's thread: a file
created, written, fsynced and renamed. The engine saves a state after each change it
publishes, and most of those saves need not be done before the next change: this takes
them off the engine's thread, and keeps only the newest of those submitted meanwhile. It
is apart from the store because it is a job of its own, with its own thread and state
(the state pending, whether a write is under way), that only calls ``StateStore.save``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .state import StateStore
from .state_format import SavedState

_WRITER_LINGER_S = 0.25
_WRITER_INTERVAL_S = 0.05
_WRITER_SETTLE_S = 0.005


class StateWriter:
    """Saves the newest submitted state on a background thread; never blocks the caller.

    States submitted while a write is in progress coalesce: only the newest is written
    next, and writes are at least ``interval_s`` apart, so a burst of changes costs a
    few writes, not one each. The thread starts on demand and ends after ``linger_s``
    idle, so an idle daemon holds no thread for it. A write starts ``settle_s`` after
    the submit that found the thread idle: the change was just pushed, and its clients
    apply it in that time on the same CPUs (a save is a file created, written, fsynced
    and renamed). ``on_result(error)`` runs on that thread after each write (``None`` on
    success; any exception the save raised, not only an ``OSError``: the thread goes on to
    the next state either way). ``flush`` waits until everything submitted is written (or
    has failed); ``close`` flushes and stops accepting states.
    """

    def __init__(
        self,
        store: StateStore,
        on_result: Callable[[Exception | None], None],
        *,
        linger_s: float = _WRITER_LINGER_S,
        interval_s: float = _WRITER_INTERVAL_S,
        settle_s: float = _WRITER_SETTLE_S,
        name: str = "hotknob-state-writer",
    ):
        self.store = store
        self._on_result = on_result
        self._linger_s = linger_s
        self._interval_s = interval_s
        self._settle_s = settle_s
        self._name = name
        self._cond = threading.Condition()
        self._pending: SavedState | None = None
        self._busy = False
        self._idle = False  # the thread waits for a state (not in its pause between writes)
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, state: SavedState) -> None:
        """Have ``state`` written soon, replacing any state not yet written."""
        with self._cond:
            if self._closed:
                return
            self._pending = state
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif self._idle:
                # Only an idle thread needs waking: one in its pause takes the newest
                # state when the pause ends, so a burst of submits costs no wake-ups.
                self._cond.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no state is pending or being written; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Write what is pending, then stop the thread; later submits are ignored."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        next_write = time.monotonic() + self._settle_s  # started by a submit
        while True:
            with self._cond:
                if self._pending is None and not self._closed:
                    self._idle = True
                    self._cond.wait(self._linger_s)
                    self._idle = False
                    if self._pending is not None:  # woken by a submit
                        next_write = max(next_write, time.monotonic() + self._settle_s)
                pause = next_write - time.monotonic()
                if pause > 0 and not self._closed:
                    self._cond.wait_for(lambda: self._closed, pause)
                state, self._pending = self._pending, None
                if state is None:
                    self._thread = None
                    self._cond.notify_all()
                    return
                self._busy = True
            next_write = time.monotonic() + self._interval_s
            error: Exception | None = None
            try:
                self.store.save(state)
            except Exception as exc:  # a bug past OSError must not end the saving, nor ``flush``
                error = exc
            try:
                self._on_result(error)
            except Exception:  # a failing reporter must not stop the saving
                pass
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
