"""What an operator reads of ``history --json`` (typed values, a deletion told apart from a
key set to null) and of ``watch`` across a restart of the daemon it watches.

Real etcd, real daemons, and the CLI as a user runs it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from hotknob.config.secrecy import SECRET_MASK
from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer
from tests.live_trainer import wait_for
from tests.test_guards import Watch

pytestmark = pytest.mark.timeout(120)

APP = "t"
P = f"/hotknob/{APP}/config/"
SCHEMA = "tests.secret_schema:Params"


def hk(etcd: EtcdServer, *args: str, schema: str | None = None) -> Any:
    chosen = ["--schema", schema] if schema else []
    return run_cli(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint, *chosen)


# --- history --json: typed values ------------------------------------------------------------


def test_history_json_gives_typed_values_and_tells_a_deletion_from_null(
    etcd: EtcdServer,
) -> None:
    assert hk(etcd, "set", "train.lr=0.015").returncode == 0
    assert hk(etcd, "set", "train.grad_clip=null").returncode == 0
    assert hk(etcd, "unset", "train.grad_clip").returncode == 0
    # Written around hotknob, keys of another schema: a list, a bare word, a JSON string.
    etcd.etcdctl("put", P + "extra/stop", '["a"]')
    etcd.etcdctl("put", P + "extra/scheduler", "cosine")
    etcd.etcdctl("put", P + "extra/name", '"null"')
    done = hk(etcd, "history", "--json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)["entries"]
    shown = [(e["key"], e["value"], e["deleted"]) for e in entries]
    assert shown == [
        ("extra.name", "null", False),
        ("extra.scheduler", "cosine", False),
        ("extra.stop", ["a"], False),
        ("train.grad_clip", None, True),
        ("train.grad_clip", None, False),
        ("train.lr", 0.015, False),
    ]
    assert all(isinstance(e["revision"], int) for e in entries)
    # As ``get --json`` gives the value.
    assert json.loads(hk(etcd, "get", "train.lr", "--json").stdout) == entries[-1]["value"]
    # The table is as it was: the stored text, and ``(deleted)`` for a deletion.
    table = hk(etcd, "history", "train.grad_clip").stdout
    rows = [line.split()[-1] for line in table.splitlines()[1:3]]
    assert rows == ["(deleted)", "null"], table


def test_history_json_masks_secrets_as_before(etcd: EtcdServer) -> None:
    token = "history-typed-secret-1111"
    assert hk(etcd, "set", f"service.api_key={token}", schema=SCHEMA).returncode == 0
    assert hk(etcd, "unset", "service.api_key", schema=SCHEMA).returncode == 0
    etcd.etcdctl("put", P + "service", json.dumps({"api_key": token}))  # a section's JSON
    done = hk(etcd, "history", "service", "--json", schema=SCHEMA)
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout
    entries = json.loads(done.stdout)["entries"]
    shown = [(e["key"], e["value"], e["deleted"]) for e in entries]
    assert shown == [
        ("service", SECRET_MASK, False),
        ("service.api_key", None, True),
        ("service.api_key", SECRET_MASK, False),
    ]


# --- watch across a restart of its daemon ----------------------------------------------------


def test_watch_reconnects_when_its_daemon_restarts(etcd: EtcdServer, tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint) as daemon:
        watch = Watch(daemon)
        try:
            assert watch.next().startswith(f"watching {APP}: version")
            etcd.etcdctl("put", P + "train/lr", "0.25")
            line = watch.next()
            assert "accepted" in line and "train.lr=0.25" in line, line
            daemon.stop()
            gone = watch.next()
            assert "lost the daemon" in gone and "reconnecting" in gone, gone
            assert "not seen" in gone
            etcd.etcdctl("put", P + "train/lr", "0.5")  # while it is away: not seen
            time.sleep(0.5)
            assert watch.proc.poll() is None, "watch exited while its daemon was away"
            daemon.start()
            back = watch.next()
            assert "reconnected" in back and "version" in back and "not seen" in back, back
            etcd.etcdctl("put", P + "train/lr", "0.75")
            line = watch.next()
            assert "accepted" in line and "train.lr=0.75" in line, line
        finally:
            watch.close()
        assert watch.proc.returncode == 0


def test_watch_json_count_spans_a_restart(etcd: EtcdServer, tmp_path: Path) -> None:
    """``--count`` counts the daemon's events, not the lines about the connection, and
    survives a restart; ``--json`` says in the stream when the daemon went away and came
    back (at which version), so that a consumer knows what it did not see."""
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint) as daemon:
        watch = Watch(daemon, "--json", "--count", "2")
        try:
            # The JSON form prints nothing until an event: the put waits until the daemon
            # has the watch as a client (a fixed second was too short on a loaded machine).
            wait_for("the watch to connect", lambda: daemon.events("client_connected"), 30)
            etcd.etcdctl("put", P + "train/lr", "0.25")
            first = json.loads(watch.next())
            assert first["type"] == "event" and first["changed"] == {"train.lr": 0.25}
            daemon.stop()
            gone = json.loads(watch.next())
            assert gone["type"] == "disconnected", gone
            daemon.start()
            back = json.loads(watch.next())
            assert back["type"] == "reconnected" and isinstance(back["version"], int), back
            etcd.etcdctl("put", P + "train/lr", "0.75")
            second = json.loads(watch.next())
            assert second["type"] == "event" and second["changed"] == {"train.lr": 0.75}
            watch.proc.wait(timeout=20)
        finally:
            watch.close()
        assert watch.proc.returncode == 0


def test_watch_without_a_daemon_at_the_start_is_still_exit_3(tmp_path: Path) -> None:
    done = run_cli("watch", "--app", APP, "--socket", str(tmp_path / "none.sock"), timeout=10)
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "no hotknob daemon" in done.stderr
