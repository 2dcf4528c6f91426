"""``set --guard --wait`` when one node's daemon rejects the change and another's processes
apply it: the guard judges those, and the wait reports its verdict beside the rejection.
Real etcd, two real daemons (one with a stricter schema), raw clients."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd
from tests.etcd_server import EtcdServer
from tests.test_guards import metrics, processes, wait_for

pytestmark = pytest.mark.timeout(120)

APP = "t"


def _ack(client: RawClient, version: int, step: int) -> None:
    client.send({"type": "applied", "version": version, "step": step})


@pytest.mark.parametrize("report", ["good", "bad"])
def test_a_rejection_elsewhere_still_reports_the_guard_s_verdict(
    etcd: EtcdServer, tmp_path: Path, report: str
) -> None:
    strict = ["--schema", "tests.test_rollout:Strict"]  # sampling.temperature <= 1.2
    with (
        DaemonProcess(
            tmp_path / "n1", app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"]
        ) as d1,
        DaemonProcess(
            tmp_path / "n2", app=APP, endpoints=etcd.endpoint, extra=["--node", "n2", *strict]
        ) as d2,
        RawClient(d1.socket_path, "c1") as c1,
        RawClient(d2.socket_path, "c2") as c2,
    ):
        for client in (c1, c2):
            _ack(client, client.snapshot["version"], 0)
            client.send(metrics(1, loss=1.0))
        wait_for("both entries with a report", lambda: len(processes(etcd)) == 2)
        setting = subprocess.Popen(
            hotknob_cmd(
                "set", "sampling.temperature=1.5", "--app", APP,
                "--etcd-endpoints", etcd.endpoint, "--guard", "loss < 2", "--window", "5",
                "--wait", "60", "--json",
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            update = c1.next_update()
            assert update["changed"] == {"sampling.temperature": 1.5}
            _ack(c1, update["version"], 10)
            wait_for("n1 armed the guard", lambda: d1.events("guard_armed"))
            loss = 1.0 if report == "good" else 5.0
            for step in range(11, 20):
                c1.send(metrics(step, loss=loss))
            out, err = setting.communicate(timeout=60)
        finally:
            setting.kill()
        assert c2.no_message(0.2), "n2 rejected it: c2 got nothing"
    assert setting.returncode == 1, (out, err)
    result = json.loads(out)
    assert result["wait"]["applied"] == ["n1/c1"] and list(result["wait"]["rejected"]) == ["n2/c2"]
    warning, last = err.strip().splitlines()
    rejected = "rejected by the daemon of 1 of 2 processes (n2/c2): sampling.temperature"
    # Said at once, before the verdict: the fleet runs two configurations meanwhile.
    assert warning.startswith("hotknob: warning: ") and rejected in warning
    assert warning.endswith(f"waiting for guard {result['guard']}'s verdict where it applied")
    assert last.startswith("hotknob: revision ") and rejected in last
    if report == "good":
        assert result["verdict"]["state"] == "passed"
        assert last.endswith(f"; where it applied, guard {result['guard']} passed the change: "
                             "held for 5 steps")  # fmt: skip
    else:
        assert result["verdict"]["state"] == "reverted"
        assert f"; where it applied, guard {result['guard']} reverted the change" in last
