"""Several apps, and several daemons of one app, on one etcd and one host: each app's
keys, processes and files stay its own, and two daemons that share a node name do not
erase each other's processes from ``status``."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Short on purpose: socket paths live under it."""
    folder = Path(tempfile.mkdtemp(prefix="hk-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def entry(etcd: EtcdServer, key: str) -> dict[str, Any] | None:
    text = etcd.etcdctl("get", key, "--print-value-only").stdout.strip()
    return json.loads(text) if text else None


def test_apps_whose_names_are_prefixes_of_each_other_share_nothing(
    etcd: EtcdServer, workdir: Path
) -> None:
    # One folder for both: the same socket folder and the same --state-dir.
    extra = ["--node", "n1", "--status-every", "0"]
    with (
        DaemonProcess(workdir, app="a", endpoints=etcd.endpoint, extra=extra) as a,
        DaemonProcess(workdir, app="ab", endpoints=etcd.endpoint, extra=extra) as ab,
        RawClient(a.socket_path, name="trainer") as ca,
        RawClient(ab.socket_path, name="trainer") as cab,
    ):
        assert a.socket_path != ab.socket_path
        for client in (ca, cab):
            client.send({"type": "applied", "version": client.snapshot["version"], "step": 1})
        etcd.etcdctl("put", "/hotknob/ab/config/train/lr", "0.5")
        etcd.etcdctl("put", "/hotknob/a/config/train/lr", "0.25")
        # a's first update is its own change: ab's, written before it, never came.
        assert cab.next_update()["changed"] == {"train.lr": 0.5}
        assert ca.next_update()["changed"] == {"train.lr": 0.25}
        for app in ("a", "ab"):
            wait_for(
                f"{app}'s entry",
                lambda app=app: entry(etcd, f"/hotknob/{app}/status/n1/trainer"),
                timeout=15,
            )
        shown = run_cli("status", "--app", "a", "--json", "--etcd-endpoints", etcd.endpoint)
        assert shown.returncode == 0, shown.stderr
        assert [p["key"] for p in json.loads(shown.stdout)["processes"]] == ["n1/trainer"]
        got = run_cli("get", "--app", "a", "train.lr", "--etcd-endpoints", etcd.endpoint)
        assert got.stdout.strip() == "0.25", got.stderr
    state = sorted(p.name for p in (workdir / "state").iterdir() if p.name.endswith(".json"))
    assert state == ["a.state.json", "ab.state.json"]


def test_a_process_leaving_keeps_the_same_named_process_of_another_daemon_of_its_node(
    etcd: EtcdServer, workdir: Path
) -> None:
    """Two daemons of one app with one node name (two on a host, ``--node`` defaulting to
    its name), each with a process named ``trainer``: they write one status key. The
    daemon whose process left deleted it, though the other's process still ran, and
    ``status`` and ``set --wait`` saw no process at all."""
    extra = ["--node", "h", "--status-every", "0"]
    key = "/hotknob/sn/status/h/trainer"
    with (
        DaemonProcess(workdir / "1", app="sn", endpoints=etcd.endpoint, extra=extra) as d1,
        DaemonProcess(workdir / "2", app="sn", endpoints=etcd.endpoint, extra=extra) as d2,
    ):
        c1 = RawClient(d1.socket_path, name="trainer", pid=111)
        c1.send({"type": "applied", "version": c1.snapshot["version"], "step": 1})
        wait_for(
            "the first process's entry",
            lambda: (entry(etcd, key) or {}).get("pid") == 111,
            timeout=15,
        )
        with RawClient(d2.socket_path, name="trainer", pid=222) as c2:
            c2.send({"type": "applied", "version": c2.snapshot["version"], "step": 1})
            wait_for("the second's", lambda: (entry(etcd, key) or {}).get("pid") == 222, timeout=15)
            c1.close()
            # The first daemon writes in order: once this entry is written, it has dealt
            # with its process that left.
            with RawClient(d1.socket_path, name="marker") as marker:
                marker.send({"type": "applied", "version": marker.snapshot["version"], "step": 1})
                wait_for(
                    "the marker", lambda: entry(etcd, "/hotknob/sn/status/h/marker"), timeout=15
                )
                assert (entry(etcd, key) or {}).get("pid") == 222
        warned = d2.events("status_entry_shared")
        assert warned and warned[0]["other_pid"] == 111, d2.log()
        assert "--node" in warned[0]["reason"]


def test_watch_refuses_a_socket_path_too_long_at_once() -> None:
    """An app name of 100 characters makes a default socket path no socket can have:
    ``watch`` said there was no daemon there and to start one, which cannot help."""
    shown = run_cli(
        "watch", "--app", "L" * 100, env={"XDG_RUNTIME_DIR": ""}, drop="HOTKNOB_", timeout=15
    )
    assert shown.returncode == 1, shown.stderr
    assert "longer than a Unix socket's path may be" in shown.stderr
    assert "start one" not in shown.stderr
