"""Config files saved the way real tools and deployments save them, against a real daemon:
a config folder reached through a symlink, a file edited in place through another name
for it (as a file bind-mounted into a container is edited on the host), one file given
twice among the ``--config`` files, and a file saved as UTF-16 (a Windows tool's default)
and then as UTF-8."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import free_port
from tests.test_file_watcher import lr_yaml

pytestmark = pytest.mark.timeout(60)

QUIET_S = 1.0  # the watcher looks at the files unasked once a second: a touch is looked at
# The first save in a test may meet the first check of the files, which any start makes
# (and which reads it however it was made): only the saves after it tell.
UPDATE_S = 5.0  # far beyond the debounce: a save not seen by then is not seen at all


def lr_of(update: dict[str, Any]) -> float:
    return update["values"]["train"]["lr"]


def safe_write(path: Path, text: str) -> None:
    """Save as an editor's safe-write does: a temporary file beside it, fsynced, renamed over."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        return json.loads(answer.read())


def wait_for_health(port: int, problem: bool) -> None:
    """Wait until ``/healthz`` shows a problem of the config files, or none (it is updated
    just after the daemon logs the problem, or pushes the change)."""
    deadline = time.monotonic() + UPDATE_S
    while bool(shown := healthz(port)["config_files"]) != problem:
        assert time.monotonic() < deadline, shown
        time.sleep(0.05)


def wait_for_event(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    """The daemon's log lines of event ``name``, once there is one."""
    deadline = time.monotonic() + UPDATE_S
    while not (found := daemon.events(name)):
        assert time.monotonic() < deadline, daemon.log(since_start=True)
        time.sleep(0.05)
    return found


def test_saves_in_a_config_folder_reached_through_a_symlink_land(tmp_path: Path) -> None:
    """``conf -> /srv/conf``: the folder was watched through the link itself (inotify does
    not follow a link unless told to), so no save in it was ever seen."""
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "conf")
    path = tmp_path / "conf" / "config.yaml"
    path.write_text(lr_yaml(0.01))
    with DaemonProcess(tmp_path, configs=[path]) as daemon, RawClient(daemon.socket_path) as client:
        path.write_text(lr_yaml(0.02))
        assert lr_of(client.next_update(UPDATE_S)) == 0.02
        safe_write(path, lr_yaml(0.025))
        assert lr_of(client.next_update(UPDATE_S)) == 0.025
        path.write_text(lr_yaml(0.03))  # in place, through the link
        assert lr_of(client.next_update(UPDATE_S)) == 0.03
        safe_write(tmp_path / "real" / "config.yaml", lr_yaml(0.04))  # by its real path
        assert lr_of(client.next_update(UPDATE_S)) == 0.04
        assert client.no_message(QUIET_S / 2)  # each save once


def test_an_edit_through_another_name_for_the_file_lands(tmp_path: Path) -> None:
    """``docker run -v host/config.yaml:/etc/app/config.yaml`` edited in place on the host
    (or a hard link, as here, edited by its other name) sends no event into the folder
    watched: the edit never landed, though the daemon's path read the new text."""
    (tmp_path / "host").mkdir()
    (tmp_path / "app").mkdir()
    host = tmp_path / "host" / "config.yaml"
    host.write_text(lr_yaml(0.01))
    path = tmp_path / "app" / "config.yaml"
    os.link(host, path)
    with DaemonProcess(tmp_path, configs=[path]) as daemon, RawClient(daemon.socket_path) as client:
        for lr in (0.02, 0.03):
            with open(host, "r+") as f:  # in place, as a host editor saves a bind-mounted file
                f.truncate(0)
                f.write(lr_yaml(lr))
            assert lr_of(client.next_update(UPDATE_S)) == lr
        os.utime(host)  # a touch: looked at, read, and no change
        assert client.no_message(QUIET_S * 1.5)


def test_a_file_saved_as_utf16_is_refused_saying_so_and_its_utf8_save_lands(
    tmp_path: Path,
) -> None:
    """Saved as UTF-16 with its byte-order mark, the file was refused as "not valid UTF-8
    (byte 0)": true, but no hint that the whole file is in another encoding."""
    path = tmp_path / "config.yaml"
    path.write_text(lr_yaml(0.01))
    with DaemonProcess(tmp_path, configs=[path]) as daemon, RawClient(daemon.socket_path) as client:
        path.write_bytes(lr_yaml(0.02).encode("utf-16"))
        [refused] = wait_for_event(daemon, "config_file_invalid")
        assert refused["reason"] == (
            f"{path}: not valid UTF-8 (it starts with a UTF-16 byte-order mark: save it as UTF-8)"
        )
        path.write_text(lr_yaml(0.03), encoding="utf-8-sig")  # with a UTF-8 one: read past
        assert lr_of(client.next_update(UPDATE_S)) == 0.03
        assert client.no_message(QUIET_S / 2)


def test_a_file_given_twice_that_parses_again_is_no_longer_reported(tmp_path: Path) -> None:
    """``--config a.yaml --config a.yaml``: once the file parsed again, clearing its problem
    raised ``KeyError`` at the second copy (``config_file_check_failed``), and ``/healthz``
    said the file did not parse for as long as the daemon ran."""
    path = tmp_path / "config.yaml"
    path.write_text(lr_yaml(0.01))
    port = free_port()
    extra = ["--metrics-addr", f"127.0.0.1:{port}"]
    with (
        DaemonProcess(tmp_path, configs=[path, path], extra=extra) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        path.write_text("train: [")
        wait_for_health(port, problem=True)
        path.write_text(lr_yaml(0.02))
        assert lr_of(client.next_update(UPDATE_S)) == 0.02
        wait_for_health(port, problem=False)
        assert client.no_message(QUIET_S / 2)
        assert len(daemon.events("config_file_invalid")) == 1
        assert "config_file_check_failed" not in daemon.log(since_start=True)
