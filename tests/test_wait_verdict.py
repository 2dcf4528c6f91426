"""``set --guard ... --wait``: once the change is applied, the guard's verdict. Real etcd,
a real daemon, a process speaking the protocol (acks and reports by hand). And what
``status`` says an armed guard waits for, which a wait that ran out sends one to."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon.guard_records import ARMED, PASSED, REVERTED, GuardRecord
from hotknob.daemon.wait_verdict import verdict_text
from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd
from tests.etcd_server import EtcdServer
from tests.test_guards import APP, metrics, report_until_published, wait_for

pytestmark = pytest.mark.timeout(120)


def guard_record(window: int, **fields: Any) -> GuardRecord:
    """Guard ``g1``, ``loss < 2`` over ``window`` steps on ``train.lr``, as read from etcd."""
    record = {"id": "g1", "guard": "loss < 2", "window": window, **fields}
    return GuardRecord.from_json(json.dumps({**record, "keys": {"train.lr": {"old": 1, "new": 2}}}))


def set_in_background(etcd: EtcdServer, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        hotknob_cmd("set", "--app", APP, "--etcd-endpoints", etcd.endpoint, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def apply_next(client: RawClient, step: int) -> dict[str, Any]:
    update = client.next_update()
    client.send({"type": "applied", "version": update["version"], "step": step})
    return update


def test_set_wait_with_a_guard_returns_its_verdict(etcd: EtcdServer, tmp_path: Path) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"]) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        report_until_published(client, etcd, "c1", range(1, 6))
        guard = ["--guard", "loss < 2 * baseline", "--patience", "2"]

        # It holds: exit 0 once the guard passed it, saying so.
        done = set_in_background(etcd, "train.lr=0.05", *guard, "--window", "10", "--wait", "60")
        apply_next(client, 10)
        wait_for("the guard armed", lambda: len(daemon.events("guard_armed")) == 1)
        for step in range(11, 25):
            client.send(metrics(step, loss=1.0))
        out, err = done.communicate(timeout=60)
        assert done.returncode == 0, err
        assert "applied by the only process within" in out
        (passed,) = [line for line in out.splitlines() if line.startswith("guard ")][-1:]
        assert passed.endswith(" passed the change: held for 10 steps"), out

        # It diverges: exit 1 once the guard reverted it; --json has the verdict.
        done = set_in_background(
            etcd, "train.lr=5", *guard, "--window", "50", "--wait", "60", "--json"
        )
        apply_next(client, 30)
        wait_for("the guard armed", lambda: len(daemon.events("guard_armed")) == 2)
        for step in range(31, 35):
            client.send(metrics(step, loss=10.0))
        out, err = done.communicate(timeout=60)
        assert done.returncode == 1, (out, err)
        result = json.loads(out)
        assert result["wait"]["applied"] == ["n1/c1"]
        verdict = result["verdict"]
        assert verdict["state"] == "reverted", verdict
        assert verdict["outcome"]["restored"] == {"train.lr": 0.05}, verdict
        (line,) = err.strip().splitlines()
        assert line.startswith(f"hotknob: guard {result['guard']} reverted the change: "), line
        apply_next(client, 35)  # the revert

        # Undecided when the time is up: exit 1, the guard still armed.
        done = set_in_background(etcd, "train.lr=0.07", *guard, "--window", "1000", "--wait", "6")
        apply_next(client, 40)
        out, err = done.communicate(timeout=60)
        assert done.returncode == 1, (out, err)
        (line,) = err.strip().splitlines()
        assert "the change is applied, but guard " in line and "not decided within 6 s" in line
        assert "(it watches 1000 steps)" in line, line


def test_a_verdict_line_for_each_ending() -> None:
    def record(state: str, reason: str | None) -> GuardRecord:
        outcome = None if reason is None else {"reason": reason}
        return guard_record(5, state=state, outcome=outcome)

    assert verdict_text("g1", record(PASSED, "held for 5 steps"), 9) == (
        "guard g1 passed the change: held for 5 steps"
    )
    assert verdict_text("g1", record(REVERTED, "loss 3 >= 2"), 9) == (
        "guard g1 reverted the change: loss 3 >= 2"
    )
    assert verdict_text("g1", record("blocked", "failed; not reverted"), 9) == (
        "guard g1 failed the change, and could not revert it: failed; not reverted"
    )
    assert verdict_text("g1", record("abandoned", None), 9) == (
        "guard g1 ended unjudged (abandoned)"
    )
    assert verdict_text("g1", record(ARMED, None), 9) == (
        "the change is applied, but guard g1 has not decided within 9 s (it watches 5 steps); "
        "`hotknob status` follows it"
    )
    assert verdict_text("g1", None, 9) == (
        "guard g1: its record is gone from etcd, so no verdict will come"
    )


def test_an_armed_guard_says_which_process_is_furthest_from_its_window_s_end() -> None:
    from hotknob.daemon.guard_display import waiting_hint

    record = guard_record(100)

    def entry(key: str, start: int, step: int, when: float, done: bool = False) -> dict[str, Any]:
        window = {"from": start, "reported": True, "done": done}
        metrics = {"latest": {"loss": 1.0}, "step": step, "time": when}
        return {"key": key, "guards": {"g1": window}, "metrics": metrics}

    entries = [
        entry("n1/a", 10, 200, 990.0, done=True),
        entry("n1/b", 10, 95, 995.0),
        entry("n2/a", 12, 30, 700.0),  # stopped reporting at step 30: hung, say
    ]
    assert waiting_hint(record, entries, now=1000.0) == (
        "waiting for the end of the window of n1/b, n2/a; the furthest from its end: n2/a, "
        "at step 30 of a window to 112, last report 5m00s ago"
    )
    # A report without a step (written by hand): the names alone.
    entries[2]["metrics"].pop("step")
    entries[1]["metrics"].pop("step")
    assert waiting_hint(record, entries, now=1000.0) == (
        "waiting for the end of the window of n1/b, n2/a"
    )
