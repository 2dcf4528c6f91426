"""Restart-only keys where the ranks' daemons hold them differently: real etcd, three real
daemons, three real gloo ranks, the real CLI.

Node n0's daemon starts with ``train.batch_size`` 32; a ``set`` of 64 follows, which it holds
back (``restart_pending``). Nodes n1 and n2 start after it, with 64; n2's daemon also sets
``train.lr`` 0.1 (``--set``). Rank N runs on node nN; the ranks agree on rank 0's values,
batch size 32 on every rank.

Rank 1 never acknowledged them: it kept its daemon's first state as sent, batch size 64, not
held at the 32 it took at the first agreement, so no state of its daemon's ever held the
values it runs; ``status`` showed it ``- (2 pending)`` and ``set --wait`` called it hung
until a live change. Rank 2 runs rank 0's values in place of its daemon's (lr 0.1 there) and
says so (``agreed``), but that ack did not name the restart-only key it holds: its entry lost
``held``, as if it ran the batch size its daemon wants.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer
from tests.test_distributed import _reap, _start_ranks
from tests.test_guards import wait_for

pytestmark = pytest.mark.timeout(90)

APP = "t"
KEY = "train.batch_size"
WORLD = 3


def ranks_worker(rank: int, rdzv: str, out: Path) -> None:
    """One rank on its node's daemon (its socket in ``socket-RANK``), applying at every call
    until ``stop`` exists; the batch size, lr and momentum it runs, at each change."""
    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig
    from tests.test_distributed import _agreed_flag

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    path = (out / f"socket-{rank}").read_text()
    live = LiveConfig.connect(path, timeout=20, distributed=True, sync_every=1)
    runs = [[live[KEY], live["train.lr"], live["train.momentum"]]]
    (out / f"ready-{rank}").touch()
    step = 0
    while step % 20 or not _agreed_flag((out / "stop").exists()):
        step += 1
        if live.apply(step):
            runs.append([live[KEY], live["train.lr"], live["train.momentum"]])
        time.sleep(0.005)
    live.close()
    (out / f"ranks-{rank}.json").write_text(json.dumps({"runs": runs}))
    dist.destroy_process_group()


def _cli(etcd: EtcdServer, *args: str) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = run_cli(
        *args, "--app", APP, "--etcd-endpoints", etcd.endpoint
    )
    return done


def _by_rank(etcd: EtcdServer) -> dict[int, dict[str, Any]]:
    """The status entries by rank, as their client names say (an entry of a process that
    acknowledged nothing has no ``rank``)."""
    done = _cli(etcd, "status", "--json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)["processes"]
    return {int(e["client"].rpartition("-rank")[2]): e for e in entries}


def test_ranks_whose_daemons_hold_restart_only_keys_differently_are_acknowledged(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    nodes = [DaemonProcess(tmp_path / "n0", endpoints=etcd.endpoint, extra=["--node", "n0"])]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nodes[0].start()
        etcd.etcdctl("put", f"/hotknob/{APP}/config/train/batch_size", "64")
        wait_for("n0 to hold the new batch size back", lambda: nodes[0].events("restart_pending"))
        for name, layers in (("n1", []), ("n2", ["--set", "train.lr=0.1"])):
            extra = ["--node", name, *layers]
            nodes.append(DaemonProcess(tmp_path / name, endpoints=etcd.endpoint, extra=extra))
            nodes[-1].start()
        for rank, daemon in enumerate(nodes):
            (tmp_path / f"socket-{rank}").write_text(str(daemon.socket_path))
        procs += _start_ranks("ranks", tmp_path, WORLD, "tests.test_ranks_restart_only")
        ready = [tmp_path / f"ready-{r}" for r in range(WORLD)]
        wait_for("the ranks to connect", lambda: all(p.exists() for p in ready), timeout=45)

        def settled() -> dict[int, dict[str, Any]] | None:
            entries = _by_rank(etcd)
            done = len(entries) == WORLD and all("version" in entries[r] for r in (0, 1))
            return entries if done and "pending" not in entries[1] else None

        # Rank 1 runs what its daemon sent, the batch size held at the 32 it runs: a plain
        # ack under its daemon's version, which says it waits for a restart.
        entries = wait_for("ranks 0 and 1 to acknowledge what they run", settled, timeout=15)
        assert entries[1]["held"] == [KEY] and "agreed" not in entries[1], entries[1]
        assert entries[0]["restart_pending"] == [KEY], entries[0]  # held back by n0

        # A change every daemon takes, at one revision: rank 2 says it runs rank 0's values
        # in place of its daemon's, and which restart-only key it holds.
        done = _cli(etcd, "set", "train.momentum=0.5", "--wait", "15")
        said = done.stdout + done.stderr
        assert done.returncode == 0, said
        assert "applied by all 3 processes" in said, said
        assert "runs the values agreed with rank 0 (its daemon's differ" in said, said
        entries = _by_rank(etcd)
        assert entries[2]["agreed"]["rank"] == 0 and "pending" not in entries[2], entries[2]
        assert entries[2]["held"] == [KEY], entries[2]
        assert entries[1]["held"] == [KEY] and "agreed" not in entries[1], entries[1]
        shown = _cli(etcd, "status").stdout
        (row,) = [line for line in shown.splitlines() if "-rank2" in line]
        assert "(rank 2)" in row and "as it started" in row, shown
        summary = _cli(etcd, "status", "--summary").stdout
        assert "runs the values agreed with rank 0" in summary, summary
    finally:
        (tmp_path / "stop").touch()
        _reap(procs)
        for node in nodes:
            node.stop()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"ranks-{rank}.log").read_text()
    results = [json.loads((tmp_path / f"ranks-{r}.json").read_text()) for r in range(WORLD)]
    # Every rank ran the same values at each change, the batch size agreed at the start
    # (32, never 64), and ends on rank 0's. (While the change went round, rank 2's lr may
    # have won for a moment: its state was at a lower revision than rank 0's new one.)
    runs = results[0]["runs"]
    assert all(result["runs"] == runs for result in results), results
    assert runs[0] == [32, 0.001, 0.9] and runs[-1] == [32, 0.001, 0.5], runs
    assert {batch_size for batch_size, _, _ in runs} == {32}, runs


if __name__ == "__main__":
    ranks_worker(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
