"""FileLayerWatcher with several files, one of which cannot be read.

The file that cannot be read (unparsable, or missing past its grace) changes
nothing: it keeps its last good contents, as a file held open by its writer does,
and an edit of another file is reported as usual. Its problem is told of again
after that report, so that whoever watches sees the file is still broken.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hotknob.config.errors import LayerError
from hotknob.daemon.file_watcher import FileLayerState, FileLayerWatcher
from tests.test_file_watcher import DEBOUNCE_S, GRACE_S, MAX_WAIT_S, Recorder

pytestmark = pytest.mark.timeout(30)

A_BEFORE = {"train": {"lr": 0.1}}
A_AFTER = {"train": {"lr": 0.2}}
B_BEFORE = {"sampling": {"top_p": 0.9}}
B_AFTER = {"sampling": {"top_p": 0.5}}


class OrderedRecorder(Recorder):
    """A ``Recorder`` that also notes every callback in the order it came."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def on_change(self, state: FileLayerState) -> None:
        self.calls.append("change")
        super().on_change(state)

    def on_error(self, path: Path, exc: Exception) -> None:
        self.calls.append(f"error {path.name}")
        super().on_error(path, exc)

    def on_readable(self) -> None:
        self.calls.append("readable")


@contextmanager
def watching(
    *paths: Path, ran: Mapping[Path, Mapping[str, Any]] | None = None, **kwargs: Any
) -> Iterator[tuple[FileLayerWatcher, OrderedRecorder]]:
    recorder = OrderedRecorder()
    watcher = FileLayerWatcher(
        list(paths),
        recorder.on_change,
        on_error=recorder.on_error,
        on_readable=recorder.on_readable,
        debounce_s=DEBOUNCE_S,
        max_wait_s=MAX_WAIT_S,
        missing_grace_s=GRACE_S,
        **kwargs,
    )
    watcher.start(ran)
    try:
        yield watcher, recorder
    finally:
        watcher.stop()


def _save(target: Path, text: str) -> None:
    """Save by rename, as an editor does."""
    staged = target.with_name(f".{target.name}.tmp")
    staged.write_text(text)
    os.replace(staged, target)


def _two_files(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  lr: 0.1\n")
    b.write_text("sampling:\n  top_p: 0.9\n")
    return a, b


def test_an_edit_of_another_file_lands_while_one_does_not_parse(tmp_path: Path) -> None:
    a, b = _two_files(tmp_path)
    with watching(a, b) as (watcher, recorder):
        _save(b, "sampling:\n  top_p: [\n")
        recorder.wait_for(lambda: len(recorder.errors) >= 1)
        _save(a, "train:\n  lr: 0.2\n")
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.wait_for(lambda: len(recorder.errors) >= 2)
        recorder.settle()
        assert watcher.state.files == ((a, A_AFTER), (b, B_BEFORE))
        assert recorder.calls == ["error b.yaml", "change", "error b.yaml"]
        assert all(path == b and "not valid YAML" in str(exc) for path, exc in recorder.errors)

        _save(b, "sampling:\n  top_p: 0.5\n")
        recorder.wait_for(lambda: len(recorder.changes) >= 2)
        recorder.settle()
    assert watcher.state.files == ((a, A_AFTER), (b, B_AFTER))
    assert recorder.calls == ["error b.yaml", "change", "error b.yaml", "readable", "change"]


def test_an_edit_of_another_file_lands_while_one_is_missing_past_its_grace(
    tmp_path: Path,
) -> None:
    a, b = _two_files(tmp_path)
    with watching(a, b) as (watcher, recorder):
        b.unlink()
        recorder.wait_for(lambda: len(recorder.errors) >= 1)  # its grace is over
        _save(a, "train:\n  lr: 0.2\n")
        recorder.wait_for(lambda: len(recorder.errors) >= 2)
        recorder.settle()
        assert [c.files for c in recorder.changes] == [((a, A_AFTER), (b, B_BEFORE))]
        assert recorder.calls == ["error b.yaml", "change", "error b.yaml"]
        assert "no such file" in str(recorder.errors[-1][1])

        b.write_text("sampling:\n  top_p: 0.5\n")
        recorder.wait_for(lambda: len(recorder.changes) >= 2)
        recorder.settle()
    assert watcher.state.files == ((a, A_AFTER), (b, B_AFTER))
    assert recorder.calls[3:] == ["readable", "change"]


def test_a_file_missing_within_its_grace_holds_back_an_edit_of_another(tmp_path: Path) -> None:
    """Deleted and written again (a ``git checkout`` that also edits another file): both
    land in one change, not the other file's edit first."""
    a, b = _two_files(tmp_path)
    with watching(a, b) as (_, recorder):
        b.unlink()
        a.write_text("train:\n  lr: 0.2\n")
        time.sleep(GRACE_S / 3)
        b.write_text("sampling:\n  top_p: 0.5\n")
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert [c.files for c in recorder.changes] == [((a, A_AFTER), (b, B_AFTER))]
    assert recorder.errors == []


def test_reload_applies_an_edit_of_another_file_and_reports_the_unparsable_one(
    tmp_path: Path,
) -> None:
    a, b = _two_files(tmp_path)
    with watching(a, b) as (watcher, recorder):
        b.write_text("")
        recorder.wait_for(lambda: len(recorder.errors) >= 1)
        recorder.settle()
        a.write_text("train:\n  lr: 0.2\n")
        watcher.reload()  # before the event's own check, or after it: the same end
        assert watcher.state.files == ((a, A_AFTER), (b, B_BEFORE))
        recorder.settle()
    assert [c.files for c in recorder.changes] == [((a, A_AFTER), (b, B_BEFORE))]
    assert recorder.calls[-1] == "error b.yaml"
    assert all(path == b and "empty" in str(exc) for path, exc in recorder.errors)


def test_a_file_unreadable_at_start_keeps_what_it_ran_on_while_another_changes(
    tmp_path: Path,
) -> None:
    """``start`` took the file as it was when the daemon last ran (``ran``) and told no
    ``on_error``: after a change of another file it is told of."""
    a, b = _two_files(tmp_path)
    b.write_text("sampling: {top_p: 0.")
    with watching(a, b, ran={b: B_BEFORE}) as (watcher, recorder):
        assert watcher.state.files == ((a, A_BEFORE), (b, B_BEFORE))
        assert list(watcher.unreadable_at_start) == [b]
        _save(a, "train:\n  lr: 0.2\n")
        recorder.wait_for(lambda: len(recorder.errors) >= 1)
        recorder.settle()
    assert [c.files for c in recorder.changes] == [((a, A_AFTER), (b, B_BEFORE))]
    assert recorder.calls == ["change", "error b.yaml"]
    (path, exc), *_ = recorder.errors
    assert path == b and isinstance(exc, LayerError) and "not valid YAML" in str(exc)


def test_a_reported_file_held_by_its_writer_is_not_taken_for_read_again(tmp_path: Path) -> None:
    """A file that did not parse is then rewritten in place by a slow writer, and another
    file is saved meanwhile: the change lands with the held file's last good contents, and
    the held file, not read, is still the problem it was (no ``on_readable``)."""
    a, b = _two_files(tmp_path)
    with watching(a, b, close_wait_s=3600.0) as (watcher, recorder):
        _save(b, "sampling:\n  top_p: [\n")
        recorder.wait_for(lambda: len(recorder.errors) >= 1)
        recorder.settle()
        with open(b, "w") as writer:
            writer.write("sampling:\n  top_p: 0.")
            writer.flush()
            time.sleep(MAX_WAIT_S)  # its write has been seen
            _save(a, "train:\n  lr: 0.2\n")
            recorder.wait_for(lambda: len(recorder.errors) >= 2)
            assert [c.files for c in recorder.changes] == [((a, A_AFTER), (b, B_BEFORE))]
            assert recorder.calls == ["error b.yaml", "change", "error b.yaml"]
            writer.write("5\n")
        recorder.wait_for(lambda: len(recorder.changes) >= 2)
        recorder.settle()
    assert watcher.state.files == ((a, A_AFTER), (b, B_AFTER))
    assert recorder.calls[3:] == ["readable", "change"]
