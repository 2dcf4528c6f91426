"""``set --guard --wait`` when one node's daemon rejects the change and another's processes
apply it: the guard judges those, and the wait reports its verdict beside the rejection.
Real etcd, two real daemons (one with a stricter schema), raw clients."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel, Field

from hotknob.config.schema import SamplingSchema, TrainParams
from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd
from tests.etcd_server import EtcdServer
from tests.test_guards import metrics, processes, wait_for

pytestmark = pytest.mark.timeout(120)

APP = "t"


def _ack(client: RawClient, version: int, step: int) -> None:
    client.send({"type": "applied", "version": version, "step": step})


@contextmanager
def _two_nodes(
    etcd: EtcdServer, tmp_path: Path, schema: str
) -> Iterator[tuple[DaemonProcess, RawClient, RawClient]]:
    """n1 with the built-in schema and n2 with ``schema``, one client on each that applied
    the first state and reported a loss of 1.0; n1's daemon and the two clients."""
    with (
        DaemonProcess(
            tmp_path / "n1", app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"]
        ) as d1,
        DaemonProcess(
            tmp_path / "n2",
            app=APP,
            endpoints=etcd.endpoint,
            extra=["--node", "n2", "--schema", schema],
        ) as d2,
        RawClient(d1.socket_path, "c1") as c1,
        RawClient(d2.socket_path, "c2") as c2,
    ):
        for client in (c1, c2):
            _ack(client, client.snapshot["version"], 0)
            client.send(metrics(1, loss=1.0))
        wait_for("both entries with a report", lambda: len(processes(etcd)) == 2)
        yield d1, c1, c2


@pytest.mark.parametrize("report", ["good", "bad"])
def test_a_rejection_elsewhere_still_reports_the_guard_s_verdict(
    etcd: EtcdServer, tmp_path: Path, report: str
) -> None:
    strict = "tests.test_rollout:Strict"  # sampling.temperature <= 1.2
    with _two_nodes(etcd, tmp_path, strict) as (d1, c1, c2):
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


class SlowLr(TrainParams):
    lr: float = Field(1e-3, ge=1e-3)


class NoLowerLr(BaseModel):
    """A node that refuses a learning rate below 1e-3 (an old schema, say)."""

    train: SlowLr = Field(default_factory=SlowLr)
    sampling: SamplingSchema = Field(default_factory=SamplingSchema)


def _tuner() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "examples" / "tune_live.py"
    spec = importlib.util.spec_from_file_location("tune_live", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_tuner_stops_at_a_rejection_though_the_guard_reverted_elsewhere(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The guard's verdict now comes with a rejection; a revert alone lets the tuner go on,
    but a daemon that refuses its rate would refuse the next one as well: it stops."""
    tuner = _tuner()
    no_lower = "tests.test_guard_wait_rejected:NoLowerLr"
    with _two_nodes(etcd, tmp_path, no_lower) as (d1, c1, _):
        outcome: dict[str, Any] = {}

        def change() -> None:
            common = ["--app", APP, "--etcd-endpoints", etcd.endpoint]
            guard = ["--guard", "loss < 2", "--window", "5"]
            try:
                outcome["written"] = tuner.change_rate(common, 5e-4, guard, 60)
            except tuner.Stop as exc:
                outcome["stop"] = str(exc)

        thread = threading.Thread(target=change)
        thread.start()
        try:
            update = c1.next_update()
            assert update["changed"] == {"train.lr": 5e-4}
            _ack(c1, update["version"], 10)
            wait_for("n1 armed the guard", lambda: d1.events("guard_armed"))
            for step in range(11, 20):
                c1.send(metrics(step, loss=5.0))
        finally:
            thread.join(90)
    assert "written" not in outcome, outcome
    stop = outcome["stop"]
    assert "rejected by the daemon of 1 of 2 processes (n2/c2): train.lr" in stop
    assert "; where it applied, guard " in stop and "reverted the change" in stop
