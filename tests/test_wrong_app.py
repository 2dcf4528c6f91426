"""A socket that leads to another app's daemon: its values never reach the process.

A review of many apps on one host found ``HOTKNOB_SOCKET`` (left in a shell, or a
container's environment copied from another job) silently winning over the app asked
for: ``LiveConfig.connect(app="a")`` applied app ``ab``'s values, and ``hotknob watch
--app a`` printed ``ab``'s events as ``a``'s. The daemon names its app in each snapshot
now; a client that asked for another refuses it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hotknob.model_runtime import LiveConfig

from .daemon_proc import DaemonProcess, hotknob_cmd, run_cli
from .daemon_stub import DaemonStub
from .test_state_dir import wait_for

BASE: dict[str, Any] = {"train": {"lr": 0.001}}


def test_connect_refuses_a_daemon_of_another_app_at_once(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with DaemonStub(sock_path, BASE, app="ab"):
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"serves app 'ab', not 'a'"):
            LiveConfig.connect(sock_path, timeout=20, app="a")
        assert time.monotonic() - started < 10, "it waited for the timeout"

        monkeypatch.setenv("HOTKNOB_SOCKET", sock_path)
        monkeypatch.setenv("HOTKNOB_APP", "a")
        with pytest.raises(ValueError, match=r"HOTKNOB_SOCKET"):
            LiveConfig.connect(timeout=20)

        # No app asked for: the socket given is the daemon wanted, whatever its app.
        monkeypatch.delenv("HOTKNOB_APP")
        with LiveConfig.connect(timeout=5) as live:
            assert live["train.lr"] == 0.001


def test_a_daemon_of_another_app_met_at_a_reconnect_changes_nothing(sock_path: str) -> None:
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("hotknob.model_runtime")
    logger.addHandler(handler)
    try:
        with DaemonStub(sock_path, BASE, app="a"):
            live = LiveConfig.connect(sock_path, timeout=5, app="a")
        try:
            # Another app's daemon takes the socket path (the first one has stopped).
            with DaemonStub(sock_path, {"train": {"lr": 0.9}}, app="b") as other:
                wait_for(lambda: any(m.startswith("live_wrong_app") for m in said))
                other.push({"train": {"lr": 0.8}})
                time.sleep(0.2)  # an update it would have taken by now
                assert not live.apply(1)
                assert live["train.lr"] == 0.001
            assert sum(m.startswith("live_wrong_app") for m in said) == 1
            # The app's own daemon again: its values are taken.
            with DaemonStub(sock_path, {"train": {"lr": 0.05}}, app="a"):
                wait_for(lambda: live.pending_version > 0 and live.apply(2))
                assert live["train.lr"] == 0.05
        finally:
            live.close()
    finally:
        logger.removeHandler(handler)


def test_watch_refuses_a_daemon_of_another_app(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, app="ab") as daemon:
        env = {**os.environ, "HOTKNOB_SOCKET": str(daemon.socket_path)}
        env.pop("HOTKNOB_APP", None)
        watch = hotknob_cmd("watch", "--count", "1")
        refused = subprocess.run(
            [*watch, "--app", "a"], env=env, capture_output=True, text=True, timeout=30
        )
        assert refused.returncode == 1, refused
        assert "serves app 'ab', not 'a'" in refused.stderr

        # ``--app default`` asks for that app as any other name does.
        asked = subprocess.run(
            [*watch, "--app", "default"], env=env, capture_output=True, text=True, timeout=30
        )
        assert asked.returncode == 1 and "not 'default'" in asked.stderr, asked

        # No app asked for: it watches the daemon it was given, named as it is.
        shown = subprocess.Popen(
            watch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert shown.stdout is not None
            first = shown.stdout.readline()
            assert first.startswith("watching ab:"), first
        finally:
            shown.kill()
            shown.communicate()


@pytest.mark.parametrize("node", ["x/y", "../..", "a b", "", ".n", "n\n1", "n" * 254])
def test_run_refuses_a_node_name_that_is_no_key_segment(tmp_path: Path, node: str) -> None:
    """The same review: ``--node x/y`` started, and its processes' ``<node>/<client>``
    names could no longer be told apart."""
    sock = str(tmp_path / "t.sock")
    done = run_cli("run", "--app", "t", "--node", node, "--socket", sock, timeout=15)
    assert done.returncode == 2, done
    assert "a node name is 1 to 253 letters" in done.stderr
    assert not (tmp_path / "t.sock").exists()
