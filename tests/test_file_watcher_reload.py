"""FileLayerWatcher.reload (SIGHUP) and a file a writer still holds open.

An explicit reload must not read a file that is being written in place: the
half-written file may parse (a key not yet written), and would then be served
with that key's default until the writer finishes. Like a filesystem event, it
waits for the writer's close, for at most ``close_wait_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_file_watcher import DEADLINE_S, MAX_WAIT_S, watching

pytestmark = pytest.mark.timeout(30)

BEFORE = "train:\n  lr: 0.1\n  momentum: 0.9\n"
FULL_BEFORE = {"train": {"lr": 0.1, "momentum": 0.9}}
FULL_AFTER = {"train": {"lr": 0.1, "momentum": 0.5}}


def _in_thread(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_reload_waits_for_the_writer_of_a_file_written_in_place(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(BEFORE)
    with watching(target, close_wait_s=DEADLINE_S) as (watcher, recorder):
        with open(target, "w") as writer:  # a slow in-place writer: truncate, write half
            writer.write("train:\n  lr: 0.1\n")  # parses as it stands: momentum is to come
            writer.flush()
            time.sleep(MAX_WAIT_S)  # its write has been seen
            reload = _in_thread(watcher.reload)  # SIGHUP now
            time.sleep(MAX_WAIT_S)
            assert reload.is_alive(), "the reload did not wait for the writer"
            assert recorder.changes == [] and recorder.errors == []
            assert watcher.state.files[0][1] == FULL_BEFORE
            writer.write("  momentum: 0.5\n")
        reload.join(DEADLINE_S)
        assert not reload.is_alive()
        assert watcher.state.files[0][1] == FULL_AFTER  # read by the reload, once closed
        recorder.settle()
    assert [c.files[0][1] for c in recorder.changes] == [FULL_AFTER]
    assert recorder.errors == []


def test_reload_waits_at_most_close_wait_for_a_writer_that_keeps_the_file_open(
    tmp_path: Path,
) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(BEFORE)
    with watching(target, close_wait_s=1.0) as (watcher, recorder):
        with open(target, "w") as writer:
            writer.write("train:\n  lr: 0.1\n  momentum: 0.5\n")
            writer.flush()
            time.sleep(MAX_WAIT_S)  # its write has been seen
            began = time.monotonic()
            watcher.reload()
            waited = time.monotonic() - began
            assert watcher.state.files[0][1] == FULL_AFTER  # read, though still open
        recorder.settle()
    assert 0.3 <= waited < DEADLINE_S
    assert [c.files[0][1] for c in recorder.changes] == [FULL_AFTER]


def test_stop_ends_a_reload_that_waits_for_a_writer(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(BEFORE)
    with (
        watching(target, close_wait_s=3600.0) as (watcher, recorder),
        open(target, "w") as writer,
    ):
        writer.write("train:\n  lr: 0.1\n")
        writer.flush()
        time.sleep(MAX_WAIT_S)
        reload = _in_thread(watcher.reload)
        time.sleep(MAX_WAIT_S)
        assert reload.is_alive()
        watcher.stop()
        reload.join(DEADLINE_S)
        assert not reload.is_alive()
    assert recorder.changes == [] and recorder.errors == []
