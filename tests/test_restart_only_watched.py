"""``watch`` hears of a restart-only change: held back, it alters nothing in force, so it
is no ``change_accepted``, and before it was said only in the daemon's log. Real etcd, a
real daemon, a watch connection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon.cmd_live import _describe
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer
from tests.test_guards import kv

pytestmark = pytest.mark.timeout(60)

KEY = "/hotknob/t/config/train/batch_size"


def _next_event(watcher: RawClient) -> dict[str, Any]:
    message = watcher.next()
    while message["type"] != "event":  # an update of the values comes too, if any
        message = watcher.next()
    return message


def test_a_watcher_hears_a_restart_only_change_held_back_and_cleared(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, watch=True) as watcher,
    ):
        version = watcher.snapshot["version"]
        etcd.etcdctl("put", KEY, "64")
        held = _next_event(watcher)
        assert {k: held[k] for k in ("event", "key", "running", "wanted", "layer")} == {
            "event": "restart_pending",
            "key": "train.batch_size",
            "running": 32,
            "wanted": 64,
            "layer": "etcd",
        }, held
        assert held["revision"] == kv(etcd, KEY)[1]
        line = _describe(held)
        assert f"RESTART-ONLY rev {held['revision']} [etcd] train.batch_size=64" in line
        assert "waits for a restart" in line and "(they run 32)" in line
        etcd.etcdctl("put", KEY, "32")
        cleared = _next_event(watcher)
        assert cleared["event"] == "restart_pending_cleared", cleared
        assert (cleared["key"], cleared["running"]) == ("train.batch_size", 32)
        assert cleared["revision"] == kv(etcd, KEY)[1]
        assert "no restart is needed" in _describe(cleared)
        assert watcher.snapshot["version"] == version  # nothing in force changed
        assert [e["key"] for e in daemon.events("restart_pending")] == ["train.batch_size"]


def test_a_secret_restart_only_key_s_values_are_masked_in_its_events() -> None:
    from hotknob.daemon.logs import get_logger
    from hotknob.daemon.restart_only import RestartOnly
    from tests.test_restart_only import snapshot

    events: list[dict[str, Any]] = []
    keys = RestartOnly(
        frozenset({"hub.token"}),
        get_logger("hotknob.test"),
        secrets=frozenset({"hub.token"}),
        broadcast=events.append,
    )
    keys.start({"hub.token": "s3cret-old"})
    keys.track(snapshot({}, {"hub.token": "s3cret-new"}), "etcd", 7)
    keys.track(snapshot({}, {"hub.token": "s3cret-old"}), "etcd", 8)
    assert [(e["event"], e["revision"]) for e in events] == [
        ("restart_pending", 7),
        ("restart_pending_cleared", 8),
    ]
    assert "s3cret" not in repr(events)
