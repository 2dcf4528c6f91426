"""Config files as they are really deployed, against a real daemon (or the real watcher):
a named pipe in place of the file, a release folder's ``current`` link swapped above it,
its folder renamed away and made again, and a relative path whose folder is replaced."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from hotknob.config.errors import LayerError
from hotknob.config.files import read_config_file
from tests.daemon_proc import DaemonProcess, RawClient
from tests.test_file_watcher import lr_yaml, watching

pytestmark = pytest.mark.timeout(60)

QUIET_S = 1.0  # after the daemon is ready: its first check of the files is long done


def lr_of(update: dict) -> float:
    return update["values"]["train"]["lr"]


def test_a_named_pipe_in_place_of_a_config_file_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_config_file(path)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(2.0)
    if reader.is_alive():  # blocked on the pipe: a writer that closes at once frees it
        os.close(os.open(path, os.O_WRONLY))
        reader.join()
        pytest.fail("reading a named pipe waited for a writer")
    [error] = outcome
    assert isinstance(error, LayerError)
    assert "not a regular file" in str(error)


def test_daemon_takes_a_save_made_after_the_config_file_was_a_named_pipe(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(lr_yaml(0.01))
    daemon = DaemonProcess(tmp_path, configs=[path]).start()
    try:
        with RawClient(daemon.socket_path) as client:
            path.unlink()
            os.mkfifo(path)
            assert client.no_message(QUIET_S)
            path.unlink()
            path.write_text(lr_yaml(0.02))
            assert lr_of(client.next_update()) == 0.02
        assert "not a regular file" in daemon.log(since_start=True)
    finally:
        assert daemon.stop() == 0


def test_daemon_follows_a_swap_of_the_release_link_above_its_config(tmp_path: Path) -> None:
    """``current -> releases/r1`` swapped to ``releases/r2`` (r1 kept): no event reaches the
    folder watched, yet the new release's file is in force, and edits of it land."""
    for release, lr in (("r1", 0.01), ("r2", 0.02)):
        (tmp_path / "releases" / release / "conf").mkdir(parents=True)
        (tmp_path / "releases" / release / "conf" / "config.yaml").write_text(lr_yaml(lr))
    os.symlink("releases/r1", tmp_path / "current")
    path = tmp_path / "current" / "conf" / "config.yaml"
    with DaemonProcess(tmp_path, configs=[path]) as daemon, RawClient(daemon.socket_path) as client:
        assert client.no_message(QUIET_S)
        os.symlink("releases/r2", tmp_path / "current.new")
        os.rename(tmp_path / "current.new", tmp_path / "current")
        assert lr_of(client.next_update()) == 0.02
        path.write_text(lr_yaml(0.03))
        assert lr_of(client.next_update()) == 0.03


def test_a_folder_renamed_away_and_made_again_is_watched_again(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    path = folder / "config.yaml"
    path.write_text(lr_yaml(0.01))
    with watching(path) as (_, recorder):
        recorder.settle()  # the first check, which any start makes, is done
        os.rename(folder, tmp_path / "conf.old")
        folder.mkdir()
        path.write_text(lr_yaml(0.02))
        recorder.wait_for(lambda: len(recorder.changes) == 1)
        assert recorder.contents()["train"]["lr"] == 0.02
        path.write_text(lr_yaml(0.03))
        recorder.wait_for(lambda: len(recorder.changes) == 2)
        assert recorder.contents()["train"]["lr"] == 0.03
        (tmp_path / "conf.old" / "config.yaml").write_text(lr_yaml(0.5))  # no longer watched
        recorder.settle()
        assert len(recorder.changes) == 2


def test_a_relative_config_path_still_names_its_file_once_its_folder_is_deployed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon started in ``proj`` with ``--config conf/config.yaml``; ``proj`` is then
    deleted and deployed again: the file at that path is the one in force."""
    proj = tmp_path / "proj"
    (proj / "conf").mkdir(parents=True)
    (proj / "conf" / "config.yaml").write_text(lr_yaml(0.01))
    monkeypatch.chdir(proj)
    daemon = DaemonProcess(tmp_path, configs=[Path("conf/config.yaml")]).start()
    monkeypatch.chdir(tmp_path)
    try:
        with RawClient(daemon.socket_path) as client:
            assert client.no_message(QUIET_S)
            shutil.rmtree(proj)
            (proj / "conf").mkdir(parents=True)
            (proj / "conf" / "config.yaml").write_text(lr_yaml(0.02))
            assert lr_of(client.next_update()) == 0.02
        assert "config_file_check_failed" not in daemon.log(since_start=True)
    finally:
        daemon.stop()


def test_a_folder_gone_for_a_while_is_logged_once_not_at_every_retry(tmp_path: Path) -> None:
    """The watcher tries a folder that is not there every half second; it said so at
    every try (two lines a second, for as long as the folder stayed away)."""
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "config.yaml"
    path.write_text(lr_yaml(0.01))
    with DaemonProcess(tmp_path, configs=[path]) as daemon, RawClient(daemon.socket_path) as client:
        assert client.no_message(QUIET_S)
        shutil.rmtree(tmp_path / "conf")
        assert client.no_message(3.0)  # six tries
        (tmp_path / "conf").mkdir()
        path.write_text(lr_yaml(0.03))
        assert lr_of(client.next_update()) == 0.03
        back = [[], [str(tmp_path / "conf")]]  # the watch is made again just after the read
        deadline = time.monotonic() + 5
        while (watched := [e["folders"] for e in daemon.events("config_folders_watched")]) != back:
            assert time.monotonic() < deadline, watched
            time.sleep(0.05)
        assert len(daemon.events("config_folder_watch_failed")) == 1
