"""Guarded changes as an operator meets them: two daemons of one app, processes that
leave and come back, what ``status`` and ``set --guard`` say. Real etcd, real daemons,
raw clients."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import (
    P,
    guarded_set,
    kv,
    metrics,
    processes,
    report_until_published,
    wait_for,
)
from tests.test_guards_judging import ack, ended, step_in_status

pytestmark = pytest.mark.timeout(120)


def _done(etcd: EtcdServer, client: str) -> Any:
    """Whether ``client``'s status entry says its window of the one guard is done."""
    for entry in processes(etcd):
        if entry.get("client") == client:
            return any(w.get("done") for w in (entry.get("guards") or {}).values())
    return False


def test_two_daemons_of_one_app_on_one_host_wait_for_each_other_s_processes(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Two daemons of one app on one host (their own sockets and state dirs, the same
    node name: the host's, by default). c1 of the first holds through its window while c2
    of the second is still inside its own, then c2's loss goes to 30 times the bound three
    reports in a row: the guard reverts, where the first daemon took c2 for one of its own
    processes (it is not) and passed the guard without waiting for it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = (
        DaemonProcess(tmp_path / d, endpoints=etcd.endpoint, extra=["--node", "host1"])
        for d in ("a", "b")
    )
    with (
        a as d1,
        b as d2,
        RawClient(d1.socket_path, "c1") as c1,
        RawClient(d2.socket_path, "c2") as c2,
    ):
        for client, name in ((c1, "c1"), (c2, "c2")):
            ack(client, client.snapshot["version"], 0)
            report_until_published(client, etcd, name, range(1, 4))
        out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "5")
        for client in (c1, c2):
            ack(client, client.next_update()["version"], 10)
        wait_for("armed on both", lambda: d1.events("guard_armed") and d2.events("guard_armed"))
        c2.send(metrics(11, loss=1.0))  # inside its window, holding so far
        wait_for("c2's report in its entry", lambda: step_in_status(etcd, "c2") == 11)
        for step in range(11, 17):
            c1.send(metrics(step, loss=1.0))  # c1 is done
        wait_for("c1 done in its entry", lambda: _done(etcd, "c1"))
        time.sleep(1.0)  # the first daemon's look at the others' entries
        for step in range(12, 15):
            c2.send(metrics(step, loss=100.0))
        record = ended(etcd)
    assert record["state"] == "reverted", record
    assert "from host1/c2" in record["outcome"]["reason"], record
    assert record["outcome"]["revision"] == out["revision"]
    assert kv(etcd, P + "train/lr") == (None, 0)  # the change made it: the revert deleted it


def test_a_guard_on_a_restart_only_key_ends_saying_so(etcd: EtcdServer, tmp_path: Path) -> None:
    """``train.batch_size`` is restart-only: the running process keeps the value it started
    with, so the guard judges nothing and ends abandoned. Its outcome says why, where it
    said that the change altered no value in force because its value was in force already
    or a higher layer held the key: neither is so (etcd, files, env and ``--set`` never gave
    it; the new value waits for a restart)."""
    env = {"HOTKNOB_GUARD_ABANDON_AFTER_S": "1"}
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, env=env, extra=["--node", "n1"]) as d,
        RawClient(d.socket_path, "c1") as c1,
    ):
        ack(c1, c1.snapshot["version"], 0)
        report_until_published(c1, etcd, "c1", range(1, 4))
        out = guarded_set(
            etcd, "train.batch_size=64", "--guard", "loss < 2 * baseline", "--window", "5"
        )
        wait_for("the guard to be armed", lambda: d.events("guard_armed"))
        for step in range(4, 12):
            c1.send(metrics(step, loss=1.0))
        record = ended(etcd)
    assert record["state"] == "abandoned", record
    assert record["outcome"]["reason"] == (
        "the change is of restart-only keys (train.batch_size): a running process keeps the "
        "value it started with, so nothing judged it; the change stays"
    )
    assert kv(etcd, P + "train/batch_size") == ("64", out["revision"])


def _guard_row(etcd: EtcdServer) -> str:
    """The one guard's row of ``hotknob status``."""
    done = run_cli("status", "--app", "t", "--etcd-endpoints", etcd.endpoint)
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if " armed " in line]
    return row


def test_status_does_not_say_that_no_process_applied_a_change_that_one_applied_and_left(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The only process applied the guarded change, reported twice inside its window, and
    left. ``status`` said "no report yet: no process has applied the change" of the guard,
    armed until it ends abandoned: both untrue. It says that no process is connected."""
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"]) as d:
        c1 = RawClient(d.socket_path, "c1")
        ack(c1, c1.snapshot["version"], 0)
        report_until_published(c1, etcd, "c1", range(1, 4))
        guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "50")
        ack(c1, c1.next_update()["version"], 10)
        wait_for("the guard to be armed", lambda: d.events("guard_armed"))
        for step in (11, 12):
            c1.send(metrics(step, loss=1.0))
        wait_for("c1's reports in its entry", lambda: step_in_status(etcd, "c1") == 12)
        c1.close()
        wait_for("c1's entry gone", lambda: not processes(etcd))
        row = _guard_row(etcd)
    assert "no process has applied the change" not in row, row
    assert row.endswith(
        "no process is connected to a daemon of the app (one that left is not waited for): "
        "it ends abandoned unless one that ran the change comes back"
    ), row


@pytest.mark.parametrize("change", ["train.lr=0.02", "train.batch_size=64"])
def test_status_says_why_a_guarded_change_no_process_applies_has_nothing_to_judge(
    etcd: EtcdServer, tmp_path: Path, change: str
) -> None:
    """``train.lr=0.02`` while the config file holds 0.02 already, or a restart-only
    ``train.batch_size``: the process runs the change's revision (``status`` shows it at
    it) with the state it had, so it gets nothing to apply, and the guard ends abandoned.
    Meanwhile ``status`` said of the guard "no report yet: no process has applied the
    change", as if the process were behind. It says why there is nothing to judge."""
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: 0.02\n")
    with (
        DaemonProcess(
            tmp_path, endpoints=etcd.endpoint, configs=[config], extra=["--node", "n1"]
        ) as d,
        RawClient(d.socket_path, "c1") as c1,
    ):
        ack(c1, c1.snapshot["version"], 0)
        report_until_published(c1, etcd, "c1", range(1, 4))
        out = guarded_set(etcd, change, "--guard", "loss < 3", "--window", "20")
        wait_for("the guard to be armed", lambda: d.events("guard_armed"))
        wait_for(
            "c1's entry at the change's revision",
            lambda: [p for p in processes(etcd) if p["revision"] >= out["revision"]],
        )
        row = _guard_row(etcd)
    why = (
        "the change altered no value in force for n1/c1"
        if change.startswith("train.lr")
        else "n1/c1 keeps train.batch_size as started (restart-only)"
    )
    assert row.endswith(f"nothing to judge: {why} (it ends abandoned)"), row


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('guard: loss < 2\nwindow: "10"\n', "window must be a whole number >= 1, got '10'"),
        ("guard: loss < 2\nwindow: 0\n", "window must be a whole number >= 1, got 0"),
        ("guard: loss < 2\nwindow: 5\npatience: 2.5\n", "patience must be a whole number >= 1"),
    ],
)
def test_a_guard_file_s_bad_window_or_patience_names_the_file_not_an_option(
    etcd: EtcdServer, tmp_path: Path, text: str, problem: str
) -> None:
    """A window or patience that a ``--guard-file`` gives wrong is a fault of the file, as
    its other faults are (exit 1, naming the file); it was reported as the options
    ``--window`` or ``--patience``, which the command line did not give, as a usage
    error (exit 2). Nothing is written."""
    path = tmp_path / "guard.yaml"
    path.write_text(text)
    done = run_cli(
        "set", "--app", "t", "--etcd-endpoints", etcd.endpoint, "train.lr=0.5",
        "--guard-file", str(path),
    )  # fmt: skip
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"hotknob: {path}: {problem}"), done.stderr
    assert "--window" not in done.stderr and "--patience" not in done.stderr
    assert kv(etcd, P + "train/lr") == (None, 0)


def test_a_guard_waits_for_the_processes_of_a_daemon_that_restarts_meanwhile(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """c1 (node n1) and c2 (node n2) report ``loss`` before the change and apply it; then
    n2's daemon restarts (its status entries go with its lease) while c1 runs through its
    window. The guard used to pass at once on c1 alone, without a word of c2; it waits for
    c2, as for a process not heard from since the change, and c2, back, reverts it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = (
        DaemonProcess(tmp_path / d, endpoints=etcd.endpoint, extra=["--node", n])
        for d, n in (("a", "n1"), ("b", "n2"))
    )
    with a as d1, RawClient(d1.socket_path, "c1") as c1:
        d2 = b.start()
        try:
            c2 = RawClient(d2.socket_path, "c2")
            for client, name in ((c1, "c1"), (c2, "c2")):
                ack(client, client.snapshot["version"], 0)
                report_until_published(client, etcd, name, range(1, 4))
            guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "5")
            for client in (c1, c2):
                ack(client, client.next_update()["version"], 10)
            wait_for("armed on both", lambda: d1.events("guard_armed") and d2.events("guard_armed"))
            d2.stop()
            c2.close()
            wait_for("n2's entries gone", lambda: [p["client"] for p in processes(etcd)] == ["c1"])
            for step in range(11, 17):
                c1.send(metrics(step, loss=1.0))  # c1 is done
            wait_for("c1 done in its entry", lambda: _done(etcd, "c1"))
            time.sleep(1.0)  # n1's look at the other daemons' processes
            d2.start()
            wait_for("armed again", lambda: "guard_armed" in d2.log(since_start=True))
            c2 = RawClient(d2.socket_path, "c2")
            ack(c2, c2.snapshot["version"], 12)  # the state it holds, applied at step 12
            for step in range(13, 16):
                c2.send(metrics(step, loss=100.0))
            record = ended(etcd)
            c2.close()
        finally:
            d2.stop()
    assert record["state"] == "reverted", record
    assert "from n2/c2" in record["outcome"]["reason"], record
