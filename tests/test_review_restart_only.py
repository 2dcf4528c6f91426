"""Restart-only keys as an operator meets them: a real daemon, real etcd, the real CLI.

``--schema tests.test_review_restart_only:Mapped``: the built-in ``train`` section beside
``weights``, a restart-only mapping (``json_schema_extra={"live": False}``) whose keys are
set one by one (``weights.head``), as any mapping's are.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from hotknob.config.schema import TrainParams
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.live_trainer import wait_for

pytestmark = pytest.mark.timeout(60)

APP = "ro"
MAPPED = ["--schema", "tests.test_review_restart_only:Mapped"]


class Mapped(BaseModel):
    """A schema with a restart-only mapping: a process keeps the one it started with."""

    model_config = ConfigDict(extra="forbid")

    train: TrainParams = Field(default_factory=TrainParams)
    weights: dict[str, float] = Field(
        default_factory=lambda: {"head": 1.0}, json_schema_extra={"live": False}
    )


def hk(etcd: EtcdServer, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint, *MAPPED)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done


def started(etcd: EtcdServer, tmp_path: Path) -> DaemonProcess:
    return DaemonProcess(
        tmp_path, app=APP, endpoints=etcd.endpoint, extra=[*MAPPED, "--node", "n1"]
    )


def test_a_key_inside_a_restart_only_mapping_is_warned_of_and_waits_for_a_restart(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """``set weights.head=2 --wait`` changes the restart-only ``weights``: the daemon held it
    back (``status``: the new value waits for a restart), yet ``set`` gave no restart-only
    warning and ``--wait`` said plainly ``applied by the only process``."""
    with started(etcd, tmp_path) as daemon, RawClient(daemon.socket_path, "p1") as client:
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        done = ok(hk(etcd, "set", "weights.head=2", "--wait", "20"))
        assert "warning: weights is restart-only" in done.stderr, done.stderr
        assert "weights restart-only: waits for a restart of it" in done.stdout, done.stdout


def test_a_guard_on_a_key_inside_a_restart_only_mapping_is_said_to_judge_nothing(
    etcd: EtcdServer,
) -> None:
    """A guard on ``weights.head`` alone was armed with no word that no running process
    applies the change (``weights`` is restart-only), so that it can never judge it."""
    guarded = hk(etcd, "set", "weights.head=3", "--guard", "loss < 3", "--window", "5", "--dry-run")
    assert "the guard can never judge this change: weights.head" in ok(guarded).stderr, (
        guarded.stderr
    )


def test_a_restart_only_change_reverted_before_a_restart_says_none_is_needed(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """``train.batch_size`` set to 64 and back to 32 before any restart: the daemon logged
    ``restart_pending`` for 64 (with no word of what restart brings it: the daemon's),
    then nothing; its log never said that the restart it asked for is no longer needed."""
    with started(etcd, tmp_path) as daemon, RawClient(daemon.socket_path, "p1") as client:
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        ok(hk(etcd, "set", "train.batch_size=64"))
        (pending,) = wait_for("restart_pending", lambda: daemon.events("restart_pending"), 20)
        assert (pending["key"], pending["wanted"]) == ("train.batch_size", 64)
        # ... saying who must restart: a process restarted alone gets 32 again.
        assert "restart this daemon" in pending["detail"], pending
        done = ok(hk(etcd, "set", "train.batch_size=32", "--wait", "20"))
        assert "waits for a restart" not in done.stdout, done.stdout
        (cleared,) = wait_for(
            "restart_pending_cleared", lambda: daemon.events("restart_pending_cleared"), 20
        )
    assert (cleared["key"], cleared["running"], cleared["layer"]) == (
        "train.batch_size",
        32,
        "etcd",
    )


def test_a_guard_on_a_key_inside_a_restart_only_mapping_ends_saying_so(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The guard of ``weights.head`` alone judges nothing (the running process keeps the
    ``weights`` it started with) and ends abandoned: its outcome said the change altered no
    value in force, as for a value already in force, where it is of a restart-only key."""
    from tests.test_guards import guarded_set, metrics, report_until_published
    from tests.test_guards_judging import ack, ended

    env = {"HOTKNOB_GUARD_ABANDON_AFTER_S": "1"}
    extra = [*MAPPED, "--node", "n1"]
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, env=env, extra=extra) as daemon,
        RawClient(daemon.socket_path, "c1") as c1,
    ):
        ack(c1, c1.snapshot["version"], 0)
        report_until_published(c1, etcd, "c1", range(1, 4))
        guarded_set(etcd, *MAPPED, "weights.head=2", "--guard", "loss < 3", "--window", "5")
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"), 20)
        for step in range(4, 12):
            c1.send(metrics(step, loss=1.0))
        record = ended(etcd)
    assert record["state"] == "abandoned", record
    assert record["outcome"]["reason"].startswith(
        "the change is of restart-only keys (weights.head): a running process keeps"
    ), record
