"""FileLayerWatcher on a real filesystem: each way a config file gets replaced is one change.

Every test counts ``on_change`` calls exactly, after a quiet period longer than
the debounce and its maximum wait, so an extra (duplicate) report would fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hotknob.config.errors import LayerError
from hotknob.config.files import read_config_file
from hotknob.daemon.file_watcher import FileLayerState, FileLayerWatcher

DEBOUNCE_S = 0.05
MAX_WAIT_S = 0.3
GRACE_S = 0.3
QUIET_S = MAX_WAIT_S + GRACE_S + 0.2
DEADLINE_S = 10.0

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """Collects the watcher's callbacks and lets a test wait for them."""

    def __init__(self) -> None:
        self.changes: list[FileLayerState] = []
        self.errors: list[tuple[Path, Exception]] = []
        self._cond = threading.Condition()

    def on_change(self, state: FileLayerState) -> None:
        with self._cond:
            self.changes.append(state)
            self._cond.notify_all()

    def on_error(self, path: Path, exc: Exception) -> None:
        with self._cond:
            self.errors.append((path, exc))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool]) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, DEADLINE_S), "timed out waiting for the watcher"

    def settle(self) -> None:
        """Wait out any report still on its way, so the counts are final."""
        time.sleep(QUIET_S)

    def contents(self, index: int = -1, file: int = 0) -> Mapping[str, Any]:
        return self.changes[index].files[file][1]


@contextmanager
def watching(*paths: Path, **kwargs: Any) -> Iterator[tuple[FileLayerWatcher, Recorder]]:
    recorder = Recorder()
    watcher = FileLayerWatcher(
        list(paths),
        recorder.on_change,
        on_error=recorder.on_error,
        debounce_s=DEBOUNCE_S,
        max_wait_s=MAX_WAIT_S,
        missing_grace_s=GRACE_S,
        **kwargs,
    )
    watcher.start()
    try:
        yield watcher, recorder
    finally:
        watcher.stop()


def lr_yaml(lr: float) -> str:
    return f"train:\n  lr: {lr}\n  momentum: 0.9\n"


def test_start_returns_the_parsed_files_in_order(tmp_path: Path) -> None:
    first = tmp_path / "base.yaml"
    second = tmp_path / "override.json"
    first.write_text(lr_yaml(0.1))
    second.write_text(json.dumps({"train": {"lr": 0.2}}))
    with watching(first, second) as (watcher, recorder):
        assert watcher.state.files == (
            (first, {"train": {"lr": 0.1, "momentum": 0.9}}),
            (second, {"train": {"lr": 0.2}}),
        )
        second.write_text(json.dumps({"train": {"lr": 0.3}}))
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert len(recorder.changes) == 1
    state = recorder.changes[0]
    assert [path for path, _ in state.files] == [first, second]
    assert state.files[0][1] == {"train": {"lr": 0.1, "momentum": 0.9}}
    assert state.files[1][1] == {"train": {"lr": 0.3}}
    assert watcher.state == state


def _editor_save(target: Path, text: str) -> None:
    """Save the way vim and most editors do: write a temp file beside it, rename it over."""
    swap = target.with_name(f".{target.name}.swp")
    with open(swap, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    backup = target.with_name(target.name + "~")
    shutil.copy(target, backup)
    os.replace(swap, target)
    backup.unlink()


def test_each_editor_write_then_rename_is_one_change(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target) as (_, recorder):
        _editor_save(target, lr_yaml(0.01))
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
        assert len(recorder.changes) == 1
        assert recorder.contents() == {"train": {"lr": 0.01, "momentum": 0.9}}

        _editor_save(target, lr_yaml(0.02))
        recorder.wait_for(lambda: len(recorder.changes) >= 2)
        recorder.settle()
    assert len(recorder.changes) == 2
    assert recorder.contents() == {"train": {"lr": 0.02, "momentum": 0.9}}
    assert recorder.errors == []


def test_in_place_write_in_two_chunks_is_one_change(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    target.write_text(json.dumps({"train": {"lr": 0.1}}))
    with watching(target) as (_, recorder):
        with open(target, "w") as f:
            f.write('{"train": {"lr": 0.')
            f.flush()
            f.write("5}}")
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert len(recorder.changes) == 1
    assert recorder.contents() == {"train": {"lr": 0.5}}


def _git(repo: Path, *args: str) -> None:
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, timeout=20)


def test_git_checkout_of_another_branch_is_one_change(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    target = repo / "config.yaml"
    _git(repo, "init", "-q", "-b", "main")
    target.write_text(lr_yaml(0.1))
    _git(repo, "add", "config.yaml")
    _git(repo, "commit", "-q", "-m", "main values")
    _git(repo, "checkout", "-q", "-b", "other")
    target.write_text("train:\n  lr: 0.002\n  momentum: 0.5\n  warmup_steps: 100\n")
    _git(repo, "commit", "-q", "-am", "other values")
    _git(repo, "checkout", "-q", "main")
    with watching(target) as (_, recorder):
        _git(repo, "checkout", "-q", "other")
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
        assert len(recorder.changes) == 1
        assert recorder.contents() == {"train": {"lr": 0.002, "momentum": 0.5, "warmup_steps": 100}}

        _git(repo, "checkout", "-q", "main")
        recorder.wait_for(lambda: len(recorder.changes) >= 2)
        recorder.settle()
    assert len(recorder.changes) == 2
    assert recorder.contents() == {"train": {"lr": 0.1, "momentum": 0.9}}
    assert recorder.errors == []


def _configmap_version(folder: Path, name: str, text: str) -> str:
    version = f"..2025_01_01_00_00_00.{name}"
    (folder / version).mkdir()
    (folder / version / "config.yaml").write_text(text)
    return version


def _configmap_swap(mount: Path, name: str, text: str) -> None:
    """Update a mounted ConfigMap the way the kubelet does: new folder, atomic ``..data`` swap."""
    old = os.readlink(mount / "..data")
    new = _configmap_version(mount, name, text)
    os.symlink(new, mount / "..data_tmp")
    os.rename(mount / "..data_tmp", mount / "..data")
    shutil.rmtree(mount / old)


def test_each_configmap_data_symlink_swap_is_one_change(tmp_path: Path) -> None:
    mount = tmp_path / "mount"
    mount.mkdir()
    os.symlink(_configmap_version(mount, "1", lr_yaml(0.1)), mount / "..data")
    os.symlink("..data/config.yaml", mount / "config.yaml")
    target = mount / "config.yaml"
    with watching(target) as (watcher, recorder):
        assert watcher.state.files[0][1] == {"train": {"lr": 0.1, "momentum": 0.9}}
        _configmap_swap(mount, "2", lr_yaml(0.03))
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
        assert len(recorder.changes) == 1
        assert recorder.contents() == {"train": {"lr": 0.03, "momentum": 0.9}}

        _configmap_swap(mount, "3", lr_yaml(0.04))
        recorder.wait_for(lambda: len(recorder.changes) >= 2)
        recorder.settle()
    assert len(recorder.changes) == 2
    assert recorder.contents() == {"train": {"lr": 0.04, "momentum": 0.9}}
    assert recorder.errors == []


def test_half_written_file_changes_nothing_until_it_parses(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target) as (watcher, recorder):
        before = watcher.state
        target.write_text("train: {lr: 0.05, momen")
        recorder.wait_for(lambda: len(recorder.errors) >= 1)
        recorder.settle()
        assert recorder.changes == []
        assert watcher.state == before
        path, exc = recorder.errors[0]
        assert path == target
        assert isinstance(exc, LayerError)
        assert str(target) in str(exc)

        target.write_text("train: {lr: 0.05, momentum: 0.8}\n")
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert len(recorder.changes) == 1
    assert recorder.contents() == {"train": {"lr": 0.05, "momentum": 0.8}}
    assert len(recorder.errors) == 1


def test_touch_and_an_equal_rewrite_are_no_change(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target) as (_, recorder):
        os.utime(target)
        target.write_text(lr_yaml(0.1))
        target.write_text("# same values, other order\ntrain: {momentum: 0.9, lr: 0.1}\n")
        recorder.settle()
        recorder.settle()
    assert recorder.changes == []
    assert recorder.errors == []


def test_a_file_read_between_a_truncate_and_its_write_is_no_error(tmp_path: Path) -> None:
    """The read can beat the events: on a loaded machine the watcher may read a file
    that a writer has just truncated before the truncate's event reaches it. The read
    here is made to land there (the writer truncates, the file is read, the writer
    writes the same contents back); an empty file seen once, then whole again, is
    neither an error nor a change."""
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    armed, raced = threading.Event(), threading.Event()

    def read_mid_write(path: Path) -> Mapping[str, Any]:
        if path != target or not armed.is_set() or raced.is_set():
            return read_config_file(path)
        raced.set()
        with open(path, "r+") as writer:
            writer.truncate(0)
            try:
                return read_config_file(path)
            finally:
                writer.write(lr_yaml(0.1))

    with watching(target, read_file=read_mid_write) as (_, recorder):
        recorder.settle()  # the start's own reads and checks are over
        armed.set()
        os.utime(target)  # an event: the watcher checks, and meets the writer mid-write
        recorder.settle()
        recorder.settle()
    assert raced.is_set()
    assert recorder.changes == []
    assert recorder.errors == []


def test_a_change_of_type_alone_is_a_change(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("train:\n  warmup_steps: 1\n")
    with watching(target) as (_, recorder):
        target.write_text("train:\n  warmup_steps: true\n")
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert len(recorder.changes) == 1
    assert recorder.contents()["train"]["warmup_steps"] is True


def test_two_files_in_one_folder_one_change_holds_both(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    override = tmp_path / "override.toml"
    base.write_text(lr_yaml(0.1))
    override.write_text("[train]\nlr = 0.2\n")
    with watching(base, override) as (_, recorder):
        # After the watcher's first check (right after its start): on a loaded machine it
        # could read the override's new contents before the base was written.
        recorder.settle()
        override.write_text("[train]\nlr = 0.4\n")
        base.write_text(lr_yaml(0.3))
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert len(recorder.changes) == 1
    assert recorder.changes[0].files == (
        (base, {"train": {"lr": 0.3, "momentum": 0.9}}),
        (override, {"train": {"lr": 0.4}}),
    )


def test_files_in_two_folders_are_both_watched(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = tmp_path / "a" / "config.yaml"
    second = tmp_path / "b" / "config.yaml"
    first.write_text(lr_yaml(0.1))
    second.write_text(lr_yaml(0.2))
    with watching(first, second) as (_, recorder):
        second.write_text(lr_yaml(0.5))
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        first.write_text(lr_yaml(0.6))
        recorder.wait_for(lambda: len(recorder.changes) >= 2)
        recorder.settle()
    assert len(recorder.changes) == 2
    assert recorder.changes[0].files[1][1]["train"]["lr"] == 0.5
    assert recorder.changes[1].files[0][1]["train"]["lr"] == 0.6


def test_symlink_to_a_file_in_another_folder_follows_the_real_file(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    real = tmp_path / "real" / "config.yaml"
    real.write_text(lr_yaml(0.1))
    link = tmp_path / "links" / "config.yaml"
    os.symlink(real, link)
    with watching(link) as (_, recorder):
        real.write_text(lr_yaml(0.7))
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert len(recorder.changes) == 1
    assert recorder.contents() == {"train": {"lr": 0.7, "momentum": 0.9}}


def test_a_symlink_swapped_to_a_file_in_a_new_folder_is_followed(tmp_path: Path) -> None:
    for name in ("v1", "v2", "links"):
        (tmp_path / name).mkdir()
    first, second = tmp_path / "v1" / "config.yaml", tmp_path / "v2" / "config.yaml"
    first.write_text(lr_yaml(0.1))
    second.write_text(lr_yaml(0.2))
    link = tmp_path / "links" / "config.yaml"
    os.symlink(first, link)
    with watching(link) as (_, recorder):
        os.symlink(second, tmp_path / "links" / ".new")
        os.rename(tmp_path / "links" / ".new", link)  # an atomic swap, as ``ln -sfn`` does
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        second.write_text(lr_yaml(0.3))  # the new real file, edited in place
        recorder.wait_for(lambda: len(recorder.changes) >= 2)
        first.write_text(lr_yaml(0.4))  # the old one is no longer followed
        recorder.settle()
    assert [c.files[0][1]["train"]["lr"] for c in recorder.changes] == [0.2, 0.3]
    assert recorder.errors == []


def test_a_yaml_file_with_an_unhashable_key_is_reported(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target) as (_, recorder):
        target.write_text("? [a, b]\n: 1\n")
        recorder.wait_for(lambda: len(recorder.errors) >= 1)
        recorder.settle()
    assert recorder.changes == []
    (path, exc), *_ = recorder.errors
    assert path == target and isinstance(exc, LayerError) and "unhashable key" in str(exc)


def test_a_file_written_in_place_is_read_once_its_writer_closes_it(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target, close_wait_s=DEADLINE_S) as (_, recorder):
        # The watcher's first check (right after its start) done: on a loaded machine it
        # could read the half-written file before the write's event reached the watcher,
        # which is what makes it wait for the close.
        recorder.settle()
        with open(target, "w") as f:
            f.write("train:\n  lr: 0.5")  # parses as it stands: "e-3" is still to come
            f.flush()
            time.sleep(MAX_WAIT_S + GRACE_S)  # the writer pauses for longer than any debounce
            f.write("e-3\n  momentum: 0.9\n")
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert [c.files[0][1] for c in recorder.changes] == [{"train": {"lr": 5e-4, "momentum": 0.9}}]
    assert recorder.errors == []


def test_a_file_its_writer_keeps_open_is_read_after_close_wait(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target, close_wait_s=MAX_WAIT_S) as (_, recorder):
        with open(target, "w") as f:
            f.write(lr_yaml(0.2))
            f.flush()
            recorder.wait_for(lambda: len(recorder.changes) >= 1)  # while it is still open
        recorder.settle()
    assert [c.files[0][1]["train"]["lr"] for c in recorder.changes] == [0.2]


def test_reload_reports_a_change_once(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target) as (watcher, recorder):
        target.write_text(lr_yaml(0.2))
        watcher.reload()
        assert len(recorder.changes) == 1
        assert watcher.state.files[0][1] == {"train": {"lr": 0.2, "momentum": 0.9}}
        watcher.reload()
        recorder.settle()
    assert len(recorder.changes) == 1


def test_reload_reports_an_invalid_file_every_time(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target) as (watcher, recorder):
        before = watcher.state
        target.write_text("")
        recorder.wait_for(lambda: len(recorder.errors) >= 1)
        recorder.settle()
        watcher.reload()
        watcher.reload()
        assert len(recorder.errors) == 3
        assert "empty" in str(recorder.errors[-1][1])
        assert watcher.state == before
    assert recorder.changes == []


def test_a_brief_absence_is_not_an_error(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target) as (_, recorder):
        target.unlink()
        time.sleep(DEBOUNCE_S * 2)
        target.write_text(lr_yaml(0.2))
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert len(recorder.changes) == 1
    assert recorder.contents() == {"train": {"lr": 0.2, "momentum": 0.9}}
    assert recorder.errors == []


def test_a_file_still_missing_after_the_grace_is_reported(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target) as (watcher, recorder):
        before = watcher.state
        target.unlink()
        recorder.wait_for(lambda: len(recorder.errors) >= 1)
        recorder.settle()
        assert len(recorder.errors) == 1
        assert recorder.errors[0][0] == target
        assert "no such file" in str(recorder.errors[0][1])
        assert watcher.state == before

        target.write_text(lr_yaml(0.4))
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert len(recorder.changes) == 1
    assert recorder.contents() == {"train": {"lr": 0.4, "momentum": 0.9}}


def test_a_steady_stream_of_writes_still_lands(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target) as (_, recorder):
        deadline = time.monotonic() + DEADLINE_S
        step = 0
        while not recorder.changes and time.monotonic() < deadline:
            step += 1
            target.write_text(lr_yaml(step / 1000))
            time.sleep(DEBOUNCE_S / 3)
        landed_during_stream = bool(recorder.changes)
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        recorder.settle()
    assert landed_during_stream
    assert recorder.contents() == {"train": {"lr": step / 1000, "momentum": 0.9}}


def test_a_failing_callback_does_not_stop_the_watcher(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    seen: list[FileLayerState] = []
    done = threading.Event()

    def on_change(state: FileLayerState) -> None:
        seen.append(state)
        if len(seen) == 1:
            raise RuntimeError("callback bug")
        done.set()

    watcher = FileLayerWatcher([target], on_change, debounce_s=DEBOUNCE_S)
    watcher.start()
    try:
        target.write_text(lr_yaml(0.2))
        deadline = time.monotonic() + DEADLINE_S
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        target.write_text(lr_yaml(0.3))
        assert done.wait(DEADLINE_S)
    finally:
        watcher.stop()
    assert [s.files[0][1]["train"]["lr"] for s in seen] == [0.2, 0.3]


@pytest.mark.parametrize(
    ("name", "text"),
    [("config.yaml", "train: [unclosed"), ("config.json", ""), ("missing.yaml", None)],
)
def test_start_raises_on_an_unreadable_file_and_starts_nothing(
    tmp_path: Path, name: str, text: str | None
) -> None:
    target = tmp_path / name
    if text is not None:
        target.write_text(text)
    threads_before = set(threading.enumerate())
    watcher = FileLayerWatcher([target], lambda state: None)
    with pytest.raises(LayerError, match=name):
        watcher.start()
    assert set(threading.enumerate()) == threads_before
    watcher.stop()


def test_stop_joins_every_thread_and_is_idempotent(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = tmp_path / "a" / "config.yaml"
    second = tmp_path / "b" / "config.yaml"
    first.write_text(lr_yaml(0.1))
    second.write_text(lr_yaml(0.2))
    threads_before = set(threading.enumerate())
    watcher = FileLayerWatcher([first, second], lambda state: None, debounce_s=DEBOUNCE_S)
    watcher.start()
    assert len(set(threading.enumerate()) - threads_before) >= 3
    first.write_text(lr_yaml(0.3))
    watcher.stop()
    assert set(threading.enumerate()) == threads_before
    watcher.stop()
    assert set(threading.enumerate()) == threads_before


def test_a_save_by_rename_is_not_held_back_by_a_writer_of_the_file_it_replaced(
    tmp_path: Path,
) -> None:
    """One process appended to the file and keeps it open; an editor then saves by rename.
    The name now leads to the new file: the save is read as usual, not after the wait
    for the other writer's close (an hour here, longer than the recorder waits)."""
    target = tmp_path / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target, close_wait_s=3600.0) as (_, recorder), open(target, "a") as holder:
        holder.write("# a note\n")
        holder.flush()
        time.sleep(DEBOUNCE_S)  # its write has been seen
        staged = tmp_path / ".config.yaml.tmp"
        staged.write_text(lr_yaml(0.2))
        os.replace(staged, target)
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
    assert recorder.contents() == {"train": {"lr": 0.2, "momentum": 0.9}}


def test_a_save_of_another_file_is_not_held_back_by_a_writer_of_this_one(tmp_path: Path) -> None:
    """One file is being written in place by a slow writer; another is saved meanwhile. The
    other's change is reported at once, with the held file's last contents; the held file
    is read when its writer closes it (the wait for that close is an hour here)."""
    held, other = tmp_path / "a.yaml", tmp_path / "b.yaml"
    held.write_text(lr_yaml(0.1))
    other.write_text("sampling:\n  top_p: 0.9\n")
    with watching(held, other, close_wait_s=3600.0) as (_, recorder):
        with open(held, "w") as writer:
            writer.write("train:\n  lr: 0.5")  # parses as it stands: "e-3" is still to come
            writer.flush()
            time.sleep(MAX_WAIT_S)  # its write has been seen
            staged = tmp_path / ".b.yaml.tmp"
            staged.write_text("sampling:\n  top_p: 0.5\n")
            os.replace(staged, other)
            recorder.wait_for(lambda: len(recorder.changes) >= 1)
            assert recorder.contents(file=0) == {"train": {"lr": 0.1, "momentum": 0.9}}
            assert recorder.contents(file=1) == {"sampling": {"top_p": 0.5}}
            writer.write("e-3\n")
        recorder.wait_for(lambda: len(recorder.changes) >= 2)
        recorder.settle()
    assert len(recorder.changes) == 2 and recorder.errors == []
    assert recorder.contents(file=0) == {"train": {"lr": 5e-4}}
    assert recorder.contents(file=1) == {"sampling": {"top_p": 0.5}}


def test_a_folder_deleted_and_made_again_is_watched_again(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    target = conf / "config.yaml"
    target.write_text(lr_yaml(0.1))
    with watching(target) as (_, recorder):
        shutil.rmtree(conf)  # its watch goes with it
        recorder.wait_for(lambda: len(recorder.errors) >= 1)  # reported missing
        conf.mkdir()
        target.write_text(lr_yaml(0.2))
        recorder.wait_for(lambda: len(recorder.changes) >= 1)
        assert recorder.contents() == {"train": {"lr": 0.2, "momentum": 0.9}}
        target.write_text(lr_yaml(0.3))  # and watched from then on
        recorder.wait_for(lambda: len(recorder.changes) >= 2)
    assert recorder.contents() == {"train": {"lr": 0.3, "momentum": 0.9}}
