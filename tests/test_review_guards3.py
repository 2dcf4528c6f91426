"""Guards and the processes they cannot judge (``unjudged``): what comes after an
unjudged window, whom a guard waits for, and how an ending names them. Real etcd, real
daemons, raw clients."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from hotknob.daemon.etcd_store import EtcdOptions
from hotknob.daemon.guards import GuardManager
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guard_wait_rejected import _tuner
from tests.test_guards import (
    P,
    guard_records,
    guarded_set,
    kv,
    metrics,
    processes,
    report_until_published,
    wait_for,
)
from tests.test_guards_judging import ack, arm_guard, ended, step_in_status
from tests.test_wait_verdict import guard_record

pytestmark = pytest.mark.timeout(120)

N1 = ["--node", "n1"]


@pytest.mark.parametrize("when", ["first_past_the_window", "after_unjudged"])
def test_what_the_guard_reads_reported_only_past_the_window_does_not_pass_it(
    etcd: EtcdServer, tmp_path: Path, when: str
) -> None:
    """A process that reports ``loss`` only now and then (an eval loss, say) reported none
    in its window (steps 10..14), then 100 at step 20: nothing of its window was judged,
    so the guard that only it could judge ends abandoned, naming it, and is not passed
    ("held for 5 steps") on a loss twenty times over the guard's bound."""
    env = {"HOTKNOB_GUARD_ABANDON_AFTER_S": "2"}
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, env=env, extra=N1) as d,
        RawClient(d.socket_path, "c1") as c1,
    ):
        ack(c1, c1.snapshot["version"], 0)
        out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 5", "--window", "5")
        ack(c1, c1.next_update()["version"], 10)
        wait_for("the guard to be armed", lambda: d.events("guard_armed"))
        last = 14 if when == "first_past_the_window" else 16
        for step in range(11, last + 1):
            c1.send(metrics(step, tokens=100.0))
        if when == "after_unjudged":
            wait_for("c1 unjudged", lambda: d.events("guard_unjudged"))
        c1.send(metrics(20, loss=100.0))
        record = ended(etcd)
        (unjudged,) = d.events("guard_unjudged")
    assert record["state"] == "abandoned", record
    assert record["outcome"]["unjudged"] == ["n1/c1"]
    assert record["outcome"]["reason"] == (
        "no process left to judge it: n1/c1 reported no loss in the 5 steps of its window; "
        "the change stays"
    )
    assert unjudged["step"] == (20 if when == "first_past_the_window" else 15)
    assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])


@pytest.mark.parametrize("first", ["c1_passes", "c2_unjudged"])
def test_an_unjudged_process_that_reported_before_the_change_is_not_waited_for(
    etcd: EtcdServer, tmp_path: Path, first: str
) -> None:
    """c2 reported ``loss`` before the change (the record expects to hear from it), then
    reports through its window and past it without: it is done, unjudged, as another
    daemon would take it from its entry. The guard passes once c1 holds, without waiting
    the 20 s given to a process not heard from since the change, and names c2 once, as
    unjudged, not as not heard from."""
    env = {"HOTKNOB_GUARD_REPORT_WAIT_S": "20"}
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, env=env, extra=N1) as d,
        RawClient(d.socket_path, "c1") as c1,
        RawClient(d.socket_path, "c2") as c2,
    ):
        for client, name in ((c1, "c1"), (c2, "c2")):
            ack(client, client.snapshot["version"], 0)
            report_until_published(client, etcd, name, range(1, 4))  # loss 1.0
        out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "5")
        assert out["guard"] and sorted(guard_records(etcd)[0]["reporting"]) == ["n1/c1", "n1/c2"]
        for client in (c1, c2):
            ack(client, client.next_update()["version"], 10)
        wait_for("the guard to be armed", lambda: d.events("guard_armed"))

        def c1_holds() -> None:
            for step in range(11, 17):
                c1.send(metrics(step, loss=1.0))

        def c2_unjudged() -> None:
            for step in range(11, 17):
                c2.send(metrics(step, tokens=100.0))
            wait_for("c2 unjudged", lambda: d.events("guard_unjudged"))

        if first == "c1_passes":
            c1_holds()
            wait_for("c1 waiting on c2", lambda: d.events("guard_waiting"))
            c2_unjudged()
        else:
            c2_unjudged()
            c1_holds()
        record = ended(etcd, timeout=10)  # well within the 20 s
    assert record["state"] == "passed", record
    assert record["outcome"]["reason"] == (
        "held for 5 steps; n1/c2 reported no loss in the 5 steps of its window"
    )
    assert record["outcome"]["unjudged"] == ["n1/c2"] and "unheard" not in record["outcome"]


def test_an_unjudged_process_that_ends_is_still_named_unjudged_by_a_passed_guard(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """c2's window ended without ``loss``, then its run ended, while c1 was still inside its
    window: c2 was done, as a process that passed is, and did not leave before the end of
    its window; the passed outcome names it as unjudged, where it used to say nothing of
    it."""
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=N1) as d,
        RawClient(d.socket_path, "c1") as c1,
    ):
        c2 = RawClient(d.socket_path, "c2")
        arm_guard(etcd, d, c1, c2)  # loss < 3 over 20 steps, from step 10
        for step in range(11, 31):
            c2.send(metrics(step, tokens=100.0))
        wait_for("c2 unjudged", lambda: d.events("guard_unjudged"))
        c2.close()
        wait_for("c2 gone", lambda: d.events("client_disconnected"))
        for step in range(11, 31):
            c1.send(metrics(step, loss=1.0))
        record = ended(etcd)
    assert record["state"] == "passed", record
    assert record["outcome"]["reason"] == (
        "held for 20 steps; n1/c2 reported no loss in the 20 steps of its window"
    )
    assert record["outcome"]["unjudged"] == ["n1/c2"] and "left" not in record["outcome"]


def test_an_unjudged_process_that_ends_leaves_the_guard_abandoned_as_unjudged(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A typo (``los``): c1's window ends without it, then its run ends before the guard
    is abandoned. The outcome says why nothing judged it (it reported no ``los`` in its
    window), not that it left before reporting."""
    env = {"HOTKNOB_GUARD_ABANDON_AFTER_S": "2"}
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint, env=env, extra=N1) as d:
        with RawClient(d.socket_path, "c1") as c1:
            ack(c1, c1.snapshot["version"], 0)
            guarded_set(etcd, "train.lr=0.5", "--guard", "los < 3", "--window", "5")
            ack(c1, c1.next_update()["version"], 10)
            wait_for("the guard to be armed", lambda: d.events("guard_armed"))
            for step in range(11, 17):
                c1.send(metrics(step, loss=1.0))
            wait_for("c1 unjudged", lambda: d.events("guard_unjudged"))
        record = ended(etcd)
    assert record["state"] == "abandoned", record
    assert record["outcome"]["reason"] == (
        "no process left to judge it: n1/c1 reported no los in the 5 steps of its window; "
        "the change stays"
    )
    assert record["outcome"]["unjudged"] == ["n1/c1"] and record["outcome"]["left"] == []


def test_a_process_that_stops_reporting_what_the_guard_reads_past_its_window_is_done(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """c1 reports ``loss`` at steps 11..13 of its window (10..14), all good, then only
    other metrics, on and on past the window (a loss logged only in some phase, say): its
    window is over and its last judged report held, so it is done and the guard passes.
    It used to stay armed for as long as the process ran."""
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=N1) as d,
        RawClient(d.socket_path, "c1") as c1,
    ):
        ack(c1, c1.snapshot["version"], 0)
        guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "5")
        ack(c1, c1.next_update()["version"], 10)
        wait_for("the guard to be armed", lambda: d.events("guard_armed"))
        for step in range(11, 14):
            c1.send(metrics(step, loss=1.0))
        for step in range(14, 40):
            c1.send(metrics(step, tokens=100.0))
        record = ended(etcd, timeout=15)
    assert record["state"] == "passed", record
    assert record["outcome"]["reason"] == "held for 5 steps"
    assert record["outcome"]["clients"] == ["n1/c1"] and "unjudged" not in record["outcome"]
    assert not d.events("guard_unjudged")


def test_a_process_failing_when_what_the_guard_reads_stops_is_not_passed(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The same, but its last judged report failed (one of patience 3): it is watched on
    past its window until a report holds or its failures reach patience, so reports
    without ``loss`` do not pass it; one that holds does."""
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=N1) as d,
        RawClient(d.socket_path, "c1") as c1,
    ):
        ack(c1, c1.snapshot["version"], 0)
        guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "5")
        ack(c1, c1.next_update()["version"], 10)
        wait_for("the guard to be armed", lambda: d.events("guard_armed"))
        c1.send(metrics(11, loss=1.0))
        c1.send(metrics(12, loss=10.0))
        for step in range(13, 30):
            c1.send(metrics(step, tokens=100.0))
        wait_for("step 29 in status", lambda: step_in_status(etcd, "c1") == 29)
        time.sleep(1.0)
        assert [r["state"] for r in guard_records(etcd)] == ["armed"]
        c1.send(metrics(30, loss=1.0))
        record = ended(etcd)
    assert record["state"] == "passed", record


def test_a_slow_process_of_the_same_daemon_is_waited_for_until_it_applies_the_change(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """c1 and c2 both reported ``loss`` before the change; c1 applies it at once and holds
    for its window, c2 (a slower rank) applies it two seconds later and fails. The guard
    waits for c2, as it would if c2 were another daemon's process, and reverts: it used
    to pass on c1 alone, as soon as c1's window was over, and c2 was never judged."""
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=N1) as d,
        RawClient(d.socket_path, "c1") as c1,
        RawClient(d.socket_path, "c2") as c2,
    ):
        for client, name in ((c1, "c1"), (c2, "c2")):
            ack(client, client.snapshot["version"], 0)
            report_until_published(client, etcd, name, range(1, 4))  # loss 1.0
        out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "5")
        ack(c1, c1.next_update()["version"], 10)
        update = c2.next_update()  # sent, not applied yet: a long step
        wait_for("the guard to be armed", lambda: d.events("guard_armed"))
        for step in range(11, 17):
            c1.send(metrics(step, loss=1.0))
        wait_for("the guard waiting on c2", lambda: d.events("guard_waiting"))
        time.sleep(2.0)
        assert [r["state"] for r in guard_records(etcd)] == ["armed"]
        ack(c2, update["version"], 10)
        for step in range(11, 17):
            c2.send(metrics(step, loss=10.0))
        record = ended(etcd)
    assert record["state"] == "reverted", record
    assert "from n1/c2" in record["outcome"]["reason"], record
    assert out["revision"] and kv(etcd, P + "train/lr") == (None, 0)  # the change created it


def test_a_look_due_sooner_puts_forward_the_one_asked_for_later() -> None:
    """The guard's next look (``Passing.recheck``) was asked for in 20 s, to end the wait for a
    silent process that reported before the change; that process is then done (it went
    unjudged, or reported and held) within the half second after the last read of the
    other daemons' entries, so the look due then is asked for in a fraction of a second.
    It must come then, not 20 s later: the guard used to pass only when the wait ran
    out. (On the manager's own loop, no etcd: which of the two comes first on a real
    daemon is a matter of timing, and the real flow is tested above.)"""

    async def scenario() -> list[float]:
        guards = GuardManager(
            app="a",
            node="n",
            options=EtcdOptions(),  # never started: no etcd is reached
            post=lambda fn, *args: fn(*args),
            broadcast=lambda event: None,
        )
        guards._arm(guard_record(5), 10)
        active = guards._active["g1"]
        looks: list[float] = []
        guards._passing.maybe_passed = lambda guard_id, a: looks.append(time.monotonic())  # type: ignore[method-assign]
        start = time.monotonic()
        guards._passing.recheck("g1", active, 20.0)
        guards._passing.recheck("g1", active, 0.05)
        guards._passing.recheck("g1", active, 10.0)  # later than the one pending: changes nothing
        await asyncio.sleep(0.5)
        return [look - start for look in looks]

    looks = asyncio.run(scenario())
    assert len(looks) == 1 and looks[0] < 0.4, looks


def test_a_guarded_wait_that_every_daemon_rejects_still_gives_the_verdict_in_json(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """``--json`` of a guarded ``--wait`` has ``verdict`` (README): also when no process
    applied the change because every daemon rejected it. It used to have none there, while
    a wait with no process connected said ``armed``."""
    strict = ["--node", "n2", "--schema", "tests.test_rollout:Strict"]  # temperature <= 1.2
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=strict) as d,
        RawClient(d.socket_path, "c2") as c2,
    ):
        ack(c2, c2.snapshot["version"], 0)
        wait_for("c2's entry", lambda: processes(etcd))
        done = run_cli(
            "set", "sampling.temperature=1.5", "--app", "t", "--etcd-endpoints", etcd.endpoint,
            "--guard", "loss < 2", "--window", "5", "--wait", "10", "--json",
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert list(result["wait"]["rejected"]) == ["n2/c2"] and result["wait"]["applied"] == []
    assert result["verdict"] == {"state": "armed", "outcome": {}}
    assert "rejected by the daemon of 1 of 1 processes (n2/c2)" in done.stderr


def test_the_example_tuner_does_not_ask_for_more_time_when_a_daemon_rejected_the_rate(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A rejection on n2, and a guard that has not decided within the tuner's timeout on
    n1: the tuner stops for the rejection, which no longer timeout would change, so its
    line does not tell the operator to give ``--apply-timeout`` more time."""
    tuner = _tuner()
    no_lower = ["--schema", "tests.test_guard_wait_rejected:NoLowerLr"]
    with (
        DaemonProcess(tmp_path / "n1", endpoints=etcd.endpoint, extra=N1) as d1,
        DaemonProcess(
            tmp_path / "n2", endpoints=etcd.endpoint, extra=["--node", "n2", *no_lower]
        ) as d2,
        RawClient(d1.socket_path, "c1") as c1,
        RawClient(d2.socket_path, "c2") as c2,
    ):
        for client in (c1, c2):
            ack(client, client.snapshot["version"], 0)
        wait_for("both entries", lambda: len(processes(etcd)) == 2)
        common = ["--app", "t", "--etcd-endpoints", etcd.endpoint]
        guard = ["--guard", "loss < 2", "--window", "500"]
        outcome: dict[str, str] = {}

        def change() -> None:
            try:
                outcome["written"] = json.dumps(tuner.change_rate(common, 5e-4, guard, 3))
            except tuner.Stop as exc:
                outcome["stop"] = str(exc)

        thread = threading.Thread(target=change)
        thread.start()
        try:
            ack(c1, c1.next_update()["version"], 10)
            c1.send(metrics(11, loss=1.0))
        finally:
            thread.join(60)
    text = outcome["stop"]
    assert "rejected by the daemon of 1 of 2 processes (n2/c2): train.lr" in text, text
    assert "has not decided within 3 s" in text and "--apply-timeout" not in text, text
