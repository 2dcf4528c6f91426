"""Guarded changes: which processes a guard judges, when, and how it ends (real etcd, a
real daemon, raw clients)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import (
    APP,
    G,
    P,
    guard_records,
    guarded_set,
    kv,
    metrics,
    processes,
    report_until_published,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

HOST = socket.gethostname()  # the node name of a daemon given no --node
QUICK_ABANDON = {"HOTKNOB_GUARD_ABANDON_AFTER_S": "1"}


def ack(client: RawClient, version: int, step: int) -> None:
    client.send({"type": "applied", "version": version, "step": step})


def arm_guard(etcd: EtcdServer, daemon: DaemonProcess, *clients: RawClient) -> dict[str, Any]:
    """``clients`` apply the state at step 0, ``train.lr=0.5`` is set with the guard
    ``loss < 3`` over 20 steps, they apply it at step 10, and the guard is armed; the
    set's output."""
    for client in clients:
        ack(client, client.snapshot["version"], 0)
    out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "20")
    for client in clients:
        ack(client, client.next_update()["version"], 10)
    wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
    return out


def step_in_status(etcd: EtcdServer, client: str) -> Any:
    """The step of ``client``'s latest report, as its status entry shows it (None: none)."""
    mine = [p for p in processes(etcd) if p["client"] == client]
    return mine[0].get("metrics", {}).get("step") if mine else None


def ended(etcd: EtcdServer, timeout: float = 30.0) -> dict[str, Any]:
    """The first guard record that is no longer armed."""
    return dict(
        wait_for(
            "the guard to end",
            lambda: [r for r in guard_records(etcd) if r["state"] != "armed"],
            timeout,
        )[0]
    )


def test_a_run_that_starts_after_the_change_is_not_judged_and_a_guard_left_alone_is_abandoned(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint, env=QUICK_ABANDON) as daemon:
        with RawClient(daemon.socket_path, "run1") as run1:
            ack(run1, run1.snapshot["version"], 0)
            report_until_published(run1, etcd, "run1", range(1, 4))  # loss 1.0
            out = guarded_set(
                etcd, "train.lr=0.5", "--guard", "loss < 2 * baseline", "--window", "100"
            )
            ack(run1, run1.next_update()["version"], 1000)
            wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
            for step in range(1001, 1050):
                run1.send(metrics(step, loss=0.9))
        # run1 ended mid-window. The next run starts under the change (its first state
        # already holds it) with the high loss of a fresh run: nothing to compare it with.
        with RawClient(daemon.socket_path, "run2") as run2:
            ack(run2, run2.snapshot["version"], 0)
            for step in (1, 2, 3, 4):
                run2.send(metrics(step, loss=8.0))
            record = ended(etcd)
        assert record["state"] == "abandoned", record
        reason = record["outcome"]["reason"]
        assert f"{HOST}/run1 left at step 1049, 49 of its 100 steps in" in reason, reason
        assert "run2" not in reason and "the change stays" in reason
        assert record["outcome"]["left"] == [
            {"client": f"{HOST}/run1", "from": 1000, "step": 1049, "reported": True, "failures": 0}
        ]
        assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])
        assert not daemon.events("change_reverted")
        (logged,) = wait_for("guard_abandoned logged", lambda: daemon.events("guard_abandoned"))
        assert logged["level"] == "warning" and logged["reason"] == reason


def test_a_guard_no_process_ever_applied_is_abandoned(etcd: EtcdServer, tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint, env=QUICK_ABANDON) as daemon:
        out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "10")
        with RawClient(daemon.socket_path, "late") as late:  # connects after the change
            ack(late, late.snapshot["version"], 0)
            late.send(metrics(1, loss="nan"))
            record = ended(etcd)
        assert record["state"] == "abandoned"
        assert (
            "no process that ran the configuration before the change applied it"
            in (record["outcome"]["reason"])
        )
        assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])


def test_a_process_past_its_window_is_not_judged(etcd: EtcdServer, tmp_path: Path) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, "c1") as c1,
        RawClient(daemon.socket_path, "c2") as c2,
    ):
        out = arm_guard(etcd, daemon, c1, c2)
        c2.send(metrics(11, loss=1.0))  # c2, slower: mid-window
        for step in range(11, 30):  # c1: through its window (steps 10..29), all good
            c1.send(metrics(step, loss=1.0))
        # At and after step 30 (10 + 20), c1's reports are no longer judged: neither
        # failures nor a NaN revert.
        for step, loss in ((30, 100.0), (31, 100.0), (100, 100.0), (101, "nan"), (102, 100.0)):
            c1.send(metrics(step, loss=loss))
        wait_for(
            "c1's last report in status",
            lambda: step_in_status(etcd, "c1") == 102,
        )
        assert [r["state"] for r in guard_records(etcd)] == ["armed"]
        c2.send(metrics(30, loss=1.0))  # c2 is done too
        record = ended(etcd)
        assert record["state"] == "passed", record
        assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])
        assert not daemon.events("change_reverted")


@pytest.mark.parametrize(
    ("losses", "state"),
    [
        ((100.0, 100.0, 100.0), "reverted"),  # fails on, past the window: patience reached
        ((100.0, 1.0), "passed"),  # past the window, a report holds: done
    ],
)
def test_a_window_shorter_than_the_steps_between_reports_is_still_judged(
    etcd: EtcdServer, tmp_path: Path, losses: tuple[float, ...], state: str
) -> None:
    """Reports come about once a second: a fast loop's window of 20 steps may end before
    the first report after the change, which holds the window's steps all the same. It
    is judged, and a process whose last judged reports fail is watched past its window
    until one holds (done) or ``patience`` (3) of them fail (reverted)."""
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, "c1") as c1,
    ):
        out = arm_guard(etcd, daemon, c1)  # applied at step 10: its window is steps 10..29
        for step, loss in zip((60, 110, 160), losses, strict=False):  # ~50 steps a report
            c1.send(metrics(step, loss=loss))
        record = ended(etcd)
        assert record["state"] == state, record
        if state == "reverted":
            (event,) = wait_for("the revert", lambda: daemon.events("change_reverted"))
            assert f"failed on 3 reports in a row from {HOST}/c1 (steps 60..160)" in event["reason"]
        else:
            assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])
            assert not daemon.events("change_reverted")


def test_a_revert_that_a_later_edit_makes_invalid_ends_blocked_not_with_a_third_value(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # The rule is reported on band.hi itself: the old hi (10, valid and in force) must not
    # be taken for a value the daemon had rejected, and deleted (hi = 100, a value nobody set).
    schema = ["--schema", "tests.field_rule_schema:FieldRule"]
    etcd.etcdctl("put", P + "band/hi", "10")
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=schema) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        assert client.snapshot["values"]["band"] == {"lo": 0.0, "hi": 10.0}
        ack(client, client.snapshot["version"], 0)
        out = guarded_set(etcd, *schema, "band.hi=20", "--guard", "loss < 3", "--window", "50")
        assert "rejected" not in guard_records(etcd)[0]["keys"]["band.hi"]
        ack(client, client.next_update()["version"], 1)
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        later = guarded_set(etcd, *schema, "band.lo=15")  # holds only while hi is 20
        ack(client, client.next_update()["version"], 2)
        for step in (3, 4, 5):
            client.send(metrics(step, loss=9.0))
        record = ended(etcd)
        assert record["state"] == "blocked", record
        reason = record["outcome"]["reason"]
        assert "not reverted" in reason and "hi must not be below lo" in reason, reason
        assert kv(etcd, P + "band/hi") == ("20", out["revision"])
        assert kv(etcd, P + "band/lo") == ("15", later["revision"])
        assert not daemon.events("change_reverted")
        assert client.no_message()


def test_patience_over_the_evidence_kept_still_reverts(etcd: EtcdServer, tmp_path: Path) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        ack(client, client.snapshot["version"], 0)
        guard = ["--guard", "loss < 3", "--window", "1000", "--patience", "10"]
        guarded_set(etcd, "train.lr=0.5", *guard)
        ack(client, client.next_update()["version"], 1)
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        for step in range(2, 11):  # 9 failures, then a good report: the count starts again
            client.send(metrics(step, loss=100.0))
        client.send(metrics(11, loss=1.0))
        for step in range(12, 21):  # 9 more in a row: still one short
            client.send(metrics(step, loss=100.0))
        wait_for(
            "the reports in status",
            lambda: step_in_status(etcd, "c1") == 20,
        )
        assert [r["state"] for r in guard_records(etcd)] == ["armed"]
        client.send(metrics(21, loss=100.0))  # the 10th in a row
        (event,) = wait_for("the revert", lambda: daemon.events("change_reverted"), 15)
        assert f"failed on 10 reports in a row from {HOST}/c1 (steps 12..21)" in event["reason"]
        assert [e["step"] for e in event["evidence"]] == list(range(14, 22))  # the last 8


def test_a_process_that_leaves_with_failures_is_named_in_the_passed_outcome(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, "c1") as c1,
    ):
        c2 = RawClient(daemon.socket_path, "c2")
        arm_guard(etcd, daemon, c1, c2)
        c2.send(metrics(11, loss=50.0))
        c2.send(metrics(12, loss=80.0))  # two failures of patience 3, then it crashes
        wait_for(
            "c2's reports in status",
            lambda: step_in_status(etcd, "c2") == 12,
        )
        c2.close()
        for step in range(11, 31):
            c1.send(metrics(step, loss=1.0))
        record = ended(etcd)
        assert record["state"] == "passed", record
        reason = record["outcome"]["reason"]
        assert reason == (
            f"held for 20 steps; {HOST}/c2 left at step 12, 2 of its 20 steps in, with 2 failed "
            "report(s) in a row recorded (patience 3)"
        ), reason
        # Named as every other reason names a process: <node>/<client>, one of a hundred.
        assert record["outcome"]["clients"] == [f"{HOST}/c1"]
        assert record["outcome"]["left"] == [
            {"client": f"{HOST}/c2", "from": 10, "step": 12, "reported": True, "failures": 2}
        ]


def test_set_warns_of_a_metric_no_process_reports_and_status_says_what_a_guard_waits_for(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        ack(client, client.snapshot["version"], 0)
        report_until_published(client, etcd, "c1", range(1, 4))
        done = run_cli(
            "set", "--app", APP, "--etcd-endpoints", etcd.endpoint, "train.lr=0.5",
            "--guard", "los < 3", "--window", "10",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith("hotknob: warning: no process of app 't' reports los"), line
        assert "they report loss" in line
        assert kv(etcd, P + "train/lr")[0] == "0.5"
        ack(client, client.next_update()["version"], 4)
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        client.send(metrics(5, loss=1.0))
        wait_for(
            "the window in status",
            lambda: step_in_status(etcd, "c1") == 5 and processes(etcd)[0].get("guards"),
        )
        status = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint)
        assert status.returncode == 0, status.stderr
        assert "no report yet: no process reports los (they report loss)" in status.stdout
        # Spelled right, the metric is reported: no warning.
        done = run_cli(
            "set", "--app", APP, "--etcd-endpoints", etcd.endpoint, "train.momentum=0.5",
            "--guard", "loss < 3", "--window", "10",
        )  # fmt: skip
        assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_listed_process_that_comes_back_is_judged_and_not_given_up_on(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # It had a status entry when the change was written: after a reconnect (or a daemon
    # restart) it is watched again, although this connection never saw a state before R.
    # While it holds a state this daemon does not know (a version of a daemon before a
    # crash), it may still apply the change: the guard is not abandoned meanwhile.
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint, env=QUICK_ABANDON) as daemon:
        with RawClient(daemon.socket_path, "c1") as client:
            ack(client, client.snapshot["version"], 0)
            report_until_published(client, etcd, "c1", range(1, 4))
            out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "50")
            ack(client, client.next_update()["version"], 5)
            wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        wait_for("c1 gone", lambda: daemon.events("client_disconnected"))
        with RawClient(daemon.socket_path, "c1") as client:
            ack(client, 10**9, 6)  # a version this daemon never published
            time.sleep(2.5)  # over HOTKNOB_GUARD_ABANDON_AFTER_S
            assert [r["state"] for r in guard_records(etcd)] == ["armed"]
            ack(client, client.snapshot["version"], 7)
            client.send(metrics(8, loss="nan"))
            record = ended(etcd)
        assert record["state"] == "reverted", record
        assert record["outcome"]["reason"] == f"{HOST}/c1 reported loss=nan at step 8"
        assert kv(etcd, P + "train/lr") == (None, 0) and out["revision"] > 0


def test_a_daemon_that_stops_mid_window_leaves_the_guard_armed(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A clean stop (a restart, a rollout) closes every connection: that is the daemon's
    doing, not processes leaving, and the guard must stay armed for the next daemon (it
    ended ``passed`` on the word of the process already done)."""
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon:
        with RawClient(daemon.socket_path, "c1") as c1, RawClient(daemon.socket_path, "c2") as c2:
            arm_guard(etcd, daemon, c1, c2)
            c2.send(metrics(11, loss=1.0))  # c2: mid-window (steps 10..29)
            for step in range(11, 31):  # c1: through its window
                c1.send(metrics(step, loss=1.0))
            wait_for("c1's last report in status", lambda: step_in_status(etcd, "c1") == 30)
            assert [r["state"] for r in guard_records(etcd)] == ["armed"]
            assert daemon.stop() == 0
        log = daemon.log()
    assert [r["state"] for r in guard_records(etcd)] == ["armed"]
    assert "event_failed" not in log and "Traceback" not in log


@contextmanager
def reported_before(
    etcd: EtcdServer, tmp_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[DaemonProcess, RawClient, RawClient, RawClient]]:
    """A daemon (node n1) and three processes at step 0 of the first state; c1 and c2
    reported loss 1.0 (published in status), c3 reports nothing (a data loader, say)."""
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"], env=env) as d,
        RawClient(d.socket_path, "c1") as c1,
        RawClient(d.socket_path, "c2") as c2,
        RawClient(d.socket_path, "c3") as c3,
    ):
        for client in (c1, c2, c3):
            ack(client, client.snapshot["version"], 0)
        for client, name in ((c1, "c1"), (c2, "c2")):
            report_until_published(client, etcd, name, range(1, 4))
        yield d, c1, c2, c3


def test_a_process_that_reported_before_the_change_is_waited_for_one_that_did_not_is_not(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # c1 runs through its window first: the guard waits for c2's first report since the
    # change (it reports every few seconds), which fails it; c3 holds nothing back.
    with reported_before(etcd, tmp_path) as (daemon, c1, c2, c3):
        guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 2 * baseline", "--window", "20")
        assert guard_records(etcd)[0]["reporting"] == ["n1/c1", "n1/c2"]
        for client in (c1, c2, c3):
            ack(client, client.next_update()["version"], 10)
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        for step in range(11, 32):
            c1.send(metrics(step, loss=1.0))
        (waiting,) = wait_for("the wait for c2", lambda: daemon.events("guard_waiting"))
        assert waiting["processes"] == "n1/c2"
        hint = "waiting for the first report since the change from n1/c2"
        wait_for(
            "status to say so",
            lambda: (
                hint in run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint).stdout
            ),
        )
        assert guard_records(etcd)[0]["state"] == "armed"
        c2.send(metrics(40, loss=9.0))  # holds steps 11..40: the window's, 9x its baseline
        c2.send(metrics(41, loss=9.0))
        c2.send(metrics(42, loss=9.0))
        assert ended(etcd)["state"] == "reverted"
        (event,) = daemon.events("change_reverted")
        assert "from n1/c2 (steps 40..42)" in event["reason"], event


def test_a_guard_that_held_names_who_it_did_not_hear_from_in_status(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    quick = {"HOTKNOB_GUARD_REPORT_WAIT_S": "1"}
    with reported_before(etcd, tmp_path, env=quick) as (daemon, c1, c2, c3):
        guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "20")
        for client in (c1, c2, c3):
            ack(client, client.next_update()["version"], 10)
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        for step in range(11, 32):
            c1.send(metrics(step, loss=1.0))
        record = ended(etcd)
        assert record["state"] == "passed" and record["outcome"]["unheard"] == ["n1/c2"]
        shown = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint)
        assert "n1/c2 applied it but reported no loss within 1 s" in shown.stdout, shown.stdout


def test_a_guard_whose_record_is_deleted_by_hand_stops_watching_and_reverts_nothing(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # The way to end a guard that waits on a stuck process (README): delete its record.
    with reported_before(etcd, tmp_path) as (daemon, c1, c2, c3):
        out = arm_guard(etcd, daemon, c1, c2, c3)
        etcd.etcdctl("del", G + out["guard"])
        (removed,) = wait_for("the guard removed", lambda: daemon.events("guard_removed"))
        assert removed["guard"] == out["guard"] and "nothing reverted" in removed["reason"]
        for step in (11, 12, 13):
            c1.send(metrics(step, loss="nan"))
        wait_for("the reports in status", lambda: step_in_status(etcd, "c1") == 13)
        assert not daemon.events("change_reverted")
        assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])


def test_a_guarded_change_that_alters_no_value_in_force_ends_with_nothing_to_judge(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # train.lr=0.02 in etcd while the file already holds 0.02: etcd changed, the values in
    # force did not, and no process gets a new state to apply. The guard stayed armed as
    # long as the processes ran ("no process has applied the change"); the status
    # entries kept the revision before the change, as if it had not reached them.
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: 0.02\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    daemons = [
        DaemonProcess(
            tmp_path / d, endpoints=etcd.endpoint, configs=[config], extra=["--node", d],
            env=QUICK_ABANDON,
        )
        for d in ("a", "b")
    ]  # fmt: skip
    with (
        daemons[0] as da,
        daemons[1] as db,
        RawClient(da.socket_path, "c1") as c1,
        RawClient(db.socket_path, "c2") as c2,
    ):
        for client in (c1, c2):
            ack(client, client.snapshot["version"], 0)
            client.send(metrics(1, loss=1.0))
        out = guarded_set(etcd, "train.lr=0.02", "--guard", "loss < 3", "--window", "20")
        record = ended(etcd)
        assert record["state"] == "abandoned", record
        assert "altered no value in force" in record["outcome"]["reason"], record
        for client in (c1, c2):
            assert client.no_message()  # nothing to apply
        for name in ("c1", "c2"):
            entry = wait_for(
                f"{name}'s entry at the change's revision",
                lambda n=name: [
                    p for p in processes(etcd)
                    if p["client"] == n and p["revision"] >= out["revision"]
                ],
            )[0]  # fmt: skip
            assert entry["version"] == 1


def test_a_guard_no_process_reports_the_metric_of_ends_abandoned_after_the_window(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A typo (``los``): the process reports ``loss`` through its window and past it, so
    nothing judges the guard; it ends ``abandoned`` and names why, where it used to stay
    armed for as long as the run went on."""
    extra = ["--node", "n1"]
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, env=QUICK_ABANDON, extra=extra) as d,
        RawClient(d.socket_path, "c1") as c1,
    ):
        ack(c1, c1.snapshot["version"], 0)
        out = guarded_set(etcd, "train.lr=0.5", "--guard", "los < 3", "--window", "5")
        ack(c1, c1.next_update()["version"], 10)
        wait_for("the guard to be armed", lambda: d.events("guard_armed"))
        for step in range(11, 15):  # inside the window: waited for, as before
            c1.send(metrics(step, loss=1.0))
        wait_for("step 14 in status", lambda: step_in_status(etcd, "c1") == 14)
        time.sleep(1.5)  # past QUICK_ABANDON: still inside its window, so still armed
        assert [r["state"] for r in guard_records(etcd)] == ["armed"]
        c1.send(metrics(15, loss=1.0))  # the window (steps 10..14) is over
        record = ended(etcd)
        (unjudged,) = d.events("guard_unjudged")
        assert unjudged["client"] == "c1" and unjudged["step"] == 15
    assert record["state"] == "abandoned", record
    assert record["outcome"]["reason"] == (
        "no process left to judge it: n1/c1 reported no los in the 5 steps of its window; "
        "the change stays"
    )
    assert record["outcome"]["unjudged"] == ["n1/c1"]
    assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])


def test_a_guard_passed_by_one_process_names_the_one_that_reported_nothing_it_reads(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    extra = ["--node", "n1"]
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=extra) as d,
        RawClient(d.socket_path, "c1") as c1,
        RawClient(d.socket_path, "c2") as c2,
    ):
        arm_guard(etcd, d, c1, c2)  # loss < 3 over 20 steps, from step 10
        for step in range(11, 31):
            c2.send(metrics(step, tokens=100.0))  # never loss: past its window, unjudged
        wait_for("c2 unjudged", lambda: d.events("guard_unjudged"))

        def c2_window() -> Any:
            windows = next(p for p in processes(etcd) if p["client"] == "c2").get("guards")
            return [w for w in (windows or {}).values() if w.get("unjudged")]

        # Its entry says so: another node's daemon neither waits for it nor leaves the
        # guard to this one for it.
        (window,) = wait_for("c2's window published as unjudged", c2_window)
        assert window == {"from": 10, "reported": False, "done": True, "unjudged": True}
        assert [r["state"] for r in guard_records(etcd)] == ["armed"], "c1 still judges it"
        for step in range(11, 31):
            c1.send(metrics(step, loss=1.0))
        record = ended(etcd)
    assert record["state"] == "passed", record
    assert record["outcome"]["reason"] == (
        "held for 20 steps; n1/c2 reported no loss in the 20 steps of its window"
    )
    assert record["outcome"]["unjudged"] == ["n1/c2"]


def test_a_guard_nobody_on_two_nodes_judged_is_abandoned_naming_both(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Each daemon's process is done unjudged; each daemon sees the other's process watched
    by the guard, and would leave the guard to it if an unjudged window counted."""
    with (
        DaemonProcess(
            tmp_path / "n1", endpoints=etcd.endpoint, env=QUICK_ABANDON, extra=["--node", "n1"]
        ) as d1,
        DaemonProcess(
            tmp_path / "n2", endpoints=etcd.endpoint, env=QUICK_ABANDON, extra=["--node", "n2"]
        ) as d2,
        RawClient(d1.socket_path, "c1") as c1,
        RawClient(d2.socket_path, "c2") as c2,
    ):
        for client in (c1, c2):
            ack(client, client.snapshot["version"], 0)
        wait_for("both entries", lambda: len(processes(etcd)) == 2)
        guarded_set(etcd, "train.lr=0.5", "--guard", "los < 3", "--window", "5")
        for client in (c1, c2):
            ack(client, client.next_update()["version"], 10)
        for daemon in (d1, d2):
            wait_for("the guard armed", lambda d=daemon: d.events("guard_armed"))
        for step in range(11, 17):
            for client in (c1, c2):
                client.send(metrics(step, loss=1.0))
        record = ended(etcd)
    assert record["state"] == "abandoned", record
    assert record["outcome"]["unjudged"] == ["n1/c1", "n2/c2"]
    reason = record["outcome"]["reason"]
    assert reason.startswith("no process left to judge it: n1/c1") and "n2/c2" in reason, reason
    assert reason.endswith("reported no los in the 5 steps of their windows; the change stays")
