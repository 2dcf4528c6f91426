"""A live client's training loop in a thread, and the wait the tests poll a live client with.

``Trainer`` calls ``apply`` every 2 ms and records every state it applies, every one
that fails ``MLParams`` and every exception; ``wait_for`` asks a condition every 10 ms
until it holds or a deadline passes. The fault episodes, the bad-input tests and
several review tests drive a live client with them, so they are here, apart from
the fault harness.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from hotknob.config import MLParams
from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.received import thaw

CONVERGE_S = 20.0


def wait_for(what: str, done: Callable[[], Any], timeout: float = CONVERGE_S) -> Any:
    """``done()``'s first true value, asked every 10 ms; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := done()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)
    return value


class Trainer:
    """A training loop in a thread: ``apply`` every 2 ms, recording what each apply brought."""

    def __init__(self, live: LiveConfig):
        self.live = live
        self.applied: list[tuple[int, dict[str, Any]]] = []
        self.invalid: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-trainer", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> Trainer:
        self._thread.start()
        return self

    def _run(self) -> None:
        step = 0
        while not self._stop.is_set():
            step += 1
            try:
                if self.live.apply(step):
                    values = thaw(self.live.values)
                    try:
                        MLParams.model_validate(values)
                    except ValueError as exc:
                        self.invalid.append(f"version {self.live.version}: {exc}")
                    with self._lock:
                        self.applied.append((self.live.version, values))
            except Exception as exc:  # recorded and asserted on, never swallowed
                self.errors.append(repr(exc))
            self._stop.wait(0.002)

    def versions(self) -> list[int]:
        with self._lock:
            return [v for v, _ in self.applied]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
