"""What an operator does after a bad change, ``unset``, ``rollback`` and ``history``, when
etcd holds a value that cannot be read (bytes that are not UTF-8, a lone surrogate),
written around hotknob: such a value is refused by every daemon, so it must go when the
operator deletes it or rolls back to a revision without it, not be "nothing to do".

Real etcd, a real daemon with a process that applies each change, and the CLI as a user
runs it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import wait_for
from tests.test_rollout import Acking

pytestmark = pytest.mark.timeout(60)

APP = "hist"
P = f"/hotknob/{APP}/config/"
NOT_UTF8 = b"\xff\xfe"
LONE_SURROGATE = b'"\\ud800"'  # JSON text for a string no UTF-8 can carry


def hk(etcd: EtcdServer, *args: str) -> Any:
    return run_cli(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint, drop="HOTKNOB_")


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stdout


def put_raw(etcd: EtcdServer, values: dict[str, bytes]) -> int:
    """Write ``values`` (paths under the app's prefix) as another tool would, bytes as
    they are, in one transaction; its revision."""
    store = EtcdStore(EtcdOptions.from_strings(etcd.endpoint))
    try:
        return store.commit({P + path: raw for path, raw in values.items()})
    finally:
        store.close()


def held(etcd: EtcdServer) -> list[str]:
    out = etcd.etcdctl("get", P, "--prefix", "--keys-only").stdout
    return sorted(line[len(P) :] for line in out.split() if line)


def statuses(etcd: EtcdServer) -> list[str]:
    """The status entries' paths (one per connected process)."""
    out = etcd.etcdctl("get", f"/hotknob/{APP}/status/", "--prefix", "--keys-only").stdout
    return out.split()


@pytest.fixture
def fleet(etcd: EtcdServer, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon (node n1) and one process on it that applies every change it gets."""
    with (
        DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"]) as d,
        Acking(d, "p1"),
    ):
        wait_for("its status entry", lambda: bool(statuses(etcd)))
        yield d


def test_unset_deletes_a_value_that_cannot_be_read(etcd: EtcdServer) -> None:
    """``unset`` of a key (or of its section) whose etcd value cannot be read said "nothing
    to do: etcd holds no value of those keys" and left it there for every daemon to
    refuse: only ``etcdctl`` could remove it."""
    ok(hk(etcd, "set", "train.weight_decay=0.1"))
    put_raw(etcd, {"train/lr": NOT_UTF8, "train/momentum": LONE_SURROGATE})

    dry = json.loads(ok(hk(etcd, "unset", "train.lr", "--dry-run", "--json")))
    assert dry == {"train.lr": {"old": None, "new": None, "existed": True, "deleted": True}}
    shown = ok(hk(etcd, "unset", "train.lr"))
    assert shown.splitlines()[2].split() == ["train.lr", "(unreadable)", "(deleted)"], shown
    assert held(etcd) == ["train/momentum", "train/weight_decay"]

    done = json.loads(ok(hk(etcd, "unset", "train", "--json")))
    assert sorted(done["deleted"]) == ["train.momentum", "train.weight_decay"], done
    assert held(etcd) == []


def test_rollback_deletes_what_cannot_be_read_and_the_process_runs_the_target(
    etcd: EtcdServer, fleet: DaemonProcess
) -> None:
    """A rollback to a revision without a key whose value cannot be read now reported
    "rolled back" and left that value in etcd: not the state asked for, and one its
    daemon keeps refusing. It goes, and the process runs the target's values."""
    target = json.loads(ok(hk(etcd, "set", "train.lr=0.01", "--json")))["revision"]
    ok(hk(etcd, "set", "train.lr=0.5"))
    put_raw(etcd, {"sampling/top_k": NOT_UTF8, "sampling/min_p": LONE_SURROGATE})

    done = hk(etcd, "rollback", "--to-revision", str(target), "--wait", "20")
    lines = ok(done).splitlines()
    assert lines[0].startswith(f"rolled back to revision {target} at revision "), lines
    rows = sorted(line.split() for line in lines[2:5])
    assert rows == [
        ["sampling.min_p", "(unreadable)", "(deleted)"],
        ["sampling.top_k", "(unreadable)", "(deleted)"],
        ["train.lr", "0.5", "0.01"],
    ], lines
    assert "applied by the only process" in done.stdout, done.stdout
    assert held(etcd) == ["train/lr"]
    assert ok(hk(etcd, "get", "train.lr")).strip() == "0.01"

    again = hk(etcd, "rollback", "--to-revision", str(target))
    assert f"nothing to do: the config already equals its state at revision {target}" in ok(again)


def test_a_rollback_target_that_cannot_be_read_is_named_as_the_target(etcd: EtcdServer) -> None:
    """Refused, as it must be, but the line read like a fault of what etcd holds now."""
    target = put_raw(etcd, {"sampling/top_k": NOT_UTF8})
    ok(hk(etcd, "set", "sampling.top_k=5"))

    done = hk(etcd, "rollback", "--to-revision", str(target), "--dry-run")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [
        "hotknob: sampling.top_k (from etcd): value is not valid UTF-8 "
        f"(in the rollback target, revision {target})"
    ]
    assert ok(hk(etcd, "get", "sampling.top_k")).strip() == "5"
