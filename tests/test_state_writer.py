"""The background state writer: coalesces a burst to a few writes, the newest last.

Real files in a temporary state dir; the store is wrapped only to count its saves.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

from hotknob.daemon.state import StateStore
from hotknob.daemon.state_format import SavedState
from hotknob.daemon.state_writer import StateWriter


class CountingStore(StateStore):
    def __init__(self, state_dir: Path, app: str) -> None:
        super().__init__(state_dir, app)
        self.saved: list[int] = []
        self.saved_at: list[float] = []

    def save(self, state: SavedState) -> bool:
        self.saved.append(state.version)
        self.saved_at.append(time.monotonic())
        return super().save(state)


def state(version: int) -> SavedState:
    return SavedState(version=version, revision=version, values={"train": {"lr": version}})


def test_a_burst_of_submits_is_a_few_writes_and_the_newest_is_on_disk(tmp_path: Path) -> None:
    store = CountingStore(tmp_path, "w")
    results: list[Exception | None] = []
    writer = StateWriter(store, results.append, linger_s=0.5, interval_s=0.1)
    started = time.monotonic()
    for version in range(1, 501):
        writer.submit(state(version))
        time.sleep(0.0005)
    elapsed = time.monotonic() - started
    assert writer.flush(timeout=5)
    writer.close()
    # One write per interval at most (plus the first, at once), never one per submit.
    assert len(store.saved) <= elapsed / 0.1 + 2, (len(store.saved), elapsed)
    assert store.saved == sorted(store.saved)
    assert store.saved[-1] == 500
    gaps = [b - a for a, b in itertools.pairwise(store.saved_at)]
    assert all(gap >= 0.1 * 0.9 for gap in gaps), gaps
    loaded = store.load()
    assert loaded is not None and loaded.version == 500
    assert results and all(error is None for error in results)


def test_a_submit_after_an_idle_spell_is_written_after_its_settle_time(tmp_path: Path) -> None:
    store = CountingStore(tmp_path, "w")
    written = threading.Event()
    writer = StateWriter(
        store, lambda error: written.set(), linger_s=2.0, interval_s=0.05, settle_s=0.01
    )
    started = time.monotonic()
    writer.submit(state(1))
    assert written.wait(2)
    assert store.saved_at[0] - started >= 0.01  # a new thread settles too
    written.clear()
    time.sleep(0.2)  # the thread is idle now (past its pause), waiting for work
    submitted = time.monotonic()
    writer.submit(state(2))
    assert written.wait(2)
    assert 0.01 <= store.saved_at[-1] - submitted < 0.05  # its settle time, not more
    writer.close()
    assert store.saved == [1, 2]


def test_close_writes_what_is_pending_and_ignores_later_submits(tmp_path: Path) -> None:
    store = CountingStore(tmp_path, "w")
    writer = StateWriter(store, lambda error: None, linger_s=0.5, interval_s=0.5)
    writer.submit(state(1))
    writer.submit(state(2))
    writer.close()
    writer.submit(state(3))
    loaded = store.load()
    assert loaded is not None and loaded.version == 2
    assert 3 not in store.saved
