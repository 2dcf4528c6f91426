"""Restart-only keys and the value wanted, end to end: real etcd, real daemons, real
``LiveConfig`` processes, the real CLI.

``--schema tests.test_review_restart_wanted:Params``: the built-in ``train`` section
(``train.batch_size`` restart-only) beside a restart-only secret, mapping and list.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from hotknob.config import Snapshot
from hotknob.config.schema import TrainParams
from hotknob.daemon.logs import get_logger
from hotknob.daemon.restart_only import RestartOnly
from hotknob.model_runtime import LiveConfig
from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(60)

APP = "rw"
SCHEMA = ["--schema", "tests.test_review_restart_wanted:Params"]
RO = {"live": False}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: TrainParams = Field(default_factory=TrainParams)
    token: SecretStr = Field(SecretStr("tok-start-0000"), json_schema_extra=RO)
    layout: dict[str, int] = Field(default_factory=lambda: {"a": 1}, json_schema_extra=RO)
    sizes: list[int] = Field(default_factory=lambda: [1, 2], json_schema_extra=RO)
    warmup: int | float = Field(1, json_schema_extra=RO)  # steps, or a share of them


def hk(etcd: EtcdServer, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint, *SCHEMA)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done


def entries(etcd: EtcdServer) -> dict[str, dict[str, Any]]:
    return {
        e["client"]: e for e in json.loads(ok(hk(etcd, "status", "--json")).stdout)["processes"]
    }


def started(etcd: EtcdServer, workdir: Path) -> DaemonProcess:
    return DaemonProcess(workdir, app=APP, endpoints=etcd.endpoint, extra=[*SCHEMA, "--node", "n1"])


def test_a_restart_only_value_of_another_type_waits_for_a_restart(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """``warmup`` runs at 1; a ``set`` of 1.0 is held back from the process (the type counts:
    a restart brings 1.0), yet the daemon said nothing of it: no ``restart_pending`` in its
    log or in the entry, and ``--wait`` said plainly applied. Set back to 1.0 after 2, it
    logged ``restart_pending_cleared``, no restart needed, while the process kept 1."""
    with (
        started(etcd, tmp_path) as daemon,
        LiveConfig.connect(socket=daemon.socket_path, timeout=10, client="p") as live,
    ):
        live.apply(0)
        assert type(live["warmup"]) is int
        for value in ("1.0", "2", "1.0"):
            done = ok(hk(etcd, "set", f"warmup={value}", "--wait", "20"))
            assert "warmup restart-only: waits for a restart of it" in done.stdout, done.stdout
            assert entries(etcd)["p"].get("restart_pending") == ["warmup"]
        assert live["warmup"] == 1 and type(live["warmup"]) is int
        wanted = [e["wanted"] for e in daemon.events("restart_pending")]
        assert wanted == [1.0, 2, 1.0] and type(wanted[0]) is float, wanted
        assert not daemon.events("restart_pending_cleared")


def test_the_pending_keys_read_on_the_loop_are_never_edited_by_a_change() -> None:
    """A lone etcd change is taken on the watch thread (``track``) while the loop reads what
    is pending for every status entry (``Engine.pending_restart``, iterating it without the
    daemon's lock). Edited in place, that dict raised ``dictionary changed size during
    iteration`` in the daemon (``event_failed`` of ``daemon_fields_changed``: the entries
    were not written again for the new wanted value), under a flood of restart-only puts and
    reports. Here the change comes within the iteration."""
    restart = RestartOnly(frozenset({"train.batch_size", "sizes"}), get_logger("test"))
    restart.start({"train.batch_size": 32, "sizes": [1, 2]})
    restart.track(
        cast(Snapshot, SimpleNamespace(flat={"train.batch_size": 64, "sizes": [1, 2]})), "etcd"
    )
    read = restart.pending
    seen = []
    for key in read:  # as ``mask_secrets`` does on the loop
        seen.append(key)
        changed = {"train.batch_size": 32, "sizes": [3]}  # one key cleared, one pending
        restart.track(cast(Snapshot, SimpleNamespace(flat=changed)), "etcd")
    assert seen == ["train.batch_size"] and read == {"train.batch_size": 64}
    assert restart.pending == {"sizes": [3]}
