"""examples/train.py under torchrun: two ranks of a DistributedDataParallel model over gloo,
one daemon, real etcd. A change made with ``set --wait`` lands on both ranks at the same
step, and both train on with it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
APP = "ddp"


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_both_ranks_take_a_live_change_at_the_same_step(etcd: EtcdServer, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: 0.02\n")
    extra = ["--config", str(config), "--node", "n1"]
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=extra) as daemon:
        logs = [tmp_path / f"run-{rank}.jsonl" for rank in (0, 1)]
        train = subprocess.Popen(
            [
                *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
                *("--master-port", str(free_port()), str(ROOT / "examples" / "train.py")),
                *("--app", APP, "--socket", str(daemon.socket_path), "--steps", "400"),
                *("--step-delay", "0.01", "--print-every", "100000"),
                *("--log-file", str(tmp_path / "run-{rank}.jsonl")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 90
            while min(len(records(log)) for log in logs) < 20:
                assert train.poll() is None, train.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the ranks did not start training"
                time.sleep(0.2)
            done = run_cli(
                *("set", "train.lr=0.05", "--wait", "60", "--app", APP),
                *("--etcd-endpoints", etcd.endpoint),
            )
            assert done.returncode == 0, done.stderr
            assert "applied by all 2 processes within" in done.stdout, done.stdout
            _, err = train.communicate(timeout=120)
            assert train.returncode == 0, err[-3000:]
        finally:
            if train.poll() is None:
                train.kill()
                train.wait()
        runs = [records(log) for log in logs]
        assert [len(run) for run in runs] == [400, 400]
        firsts = [next(r["step"] for r in run if r["lr"] == 0.05) for run in runs]
        assert firsts[0] == firsts[1], firsts  # the same step on both ranks
        for run in runs:
            assert {r["lr"] for r in run[: firsts[0]]} == {0.02}
            assert {r["lr"] for r in run[firsts[0] :]} == {0.05}
            assert run[firsts[0]]["applied"] == run[firsts[0]]["version"]
