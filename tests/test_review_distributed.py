"""Review of the ranks' agreement (``model_runtime/distributed.py``) by real runs: ranks as
real processes over gloo, with real daemons on a real etcd, or stub daemons where the order
in which states reach the ranks must be exact."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.etcd_server import EtcdServer
from tests.test_distributed import P, _run_two_ranks, layered_ranks, status_entries, wait_for

pytestmark = pytest.mark.timeout(90)


def test_differing_local_layers_do_not_flip_while_an_edit_reaches_one_node_first(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Node A's daemon sets momentum 0.5, node B's does not (0.9): both ranks run rank 0's
    values. An lr edit that reached node A while node B's daemon was stopped made both
    ranks run rank 1's momentum (0.9), which had lost the agreement, until B caught up."""
    with layered_ranks(etcd, tmp_path) as (_, node_b, procs):
        (before,) = {e["revision"] for e in status_entries(etcd)}
        node_b.signal(signal.SIGSTOP)
        etcd.etcdctl("put", P + "train/lr", "0.3")
        time.sleep(1.0)  # agreements while only node A has the edit
        node_b.signal(signal.SIGCONT)
        wait_for(
            lambda: all(e["revision"] > before for e in status_entries(etcd)),
            20,
            "both ranks at the edit",
            procs,
        )
    for r, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"layers-{r}.log").read_text()
    r0, r1 = [json.loads((tmp_path / f"layers-{r}.json").read_text()) for r in range(2)]
    assert r0["changes"] == r1["changes"]
    assert [lr_momentum for _, *lr_momentum in r0["changes"]] == [[0.5, 0.5], [0.3, 0.5]]


def revert_worker(rank: int, rdzv: str, out: Path) -> None:
    """Two ranks, each with its own stub daemon: lr 0.002 put and reverted to 0.001 (two
    revisions), which reach rank 0 before the first agreement and rank 1 one by one."""
    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig
    from tests.daemon_stub import DaemonStub

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    steps: list[list[Any]] = []
    with DaemonStub(str(out / f"revert-{rank}.sock"), {"train": {"lr": 0.001}}) as stub:
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=1)

        def phase(step: int, *lrs: float) -> None:
            for lr in lrs:
                pushed = stub.push({"train": {"lr": lr}})
                stub.wait_for(lambda v=pushed: live._received_states()[-1].version == v)
            dist.barrier()
            steps.append([step, live.apply(step), live["train.lr"], live.revision])

        phase(1, *((0.002, 0.001) if rank == 0 else ()))
        phase(2, *(() if rank == 0 else (0.002,)))
        phase(3, *(() if rank == 0 else (0.001,)))
        stub.wait_for(lambda: stub.messages("applied")[-1]["version"] == 3)
        acked = [[m["version"], m["step"]] for m in stub.messages("applied")]
        live.close()
    (out / f"revert-{rank}.json").write_text(json.dumps({"steps": steps, "acked": acked}))
    dist.destroy_process_group()


def checkpoint_worker(rank: int, rdzv: str, out: Path) -> None:
    """Two ranks whose stub daemons differ in momentum (local layers), resumed from a
    checkpoint saved against another etcd (its revision 500, above all this one holds),
    then an lr edit on both nodes (revision 101)."""
    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig
    from tests.daemon_stub import DaemonStub

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    momentum = 0.5 if rank == 0 else 0.9
    steps: list[list[Any]] = []
    with DaemonStub(
        str(out / f"checkpoint-{rank}.sock"), {"train": {"lr": 0.001, "momentum": momentum}}
    ) as stub:
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=1)
        live.apply(1)
        saved = {**live.state_dict(), "revision": 500}
        saved["values"] = {"train": {"lr": 0.01, "momentum": 0.7}}
        live.load_state_dict(saved)
        live.apply(2)
        steps.append([2, live["train.lr"], live["train.momentum"]])
        pushed = stub.push({"train": {"lr": 0.02, "momentum": momentum}})
        stub.wait_for(lambda: live._received_states()[-1].version == pushed)
        dist.barrier()
        steps.append([3, live.apply(3), live["train.lr"], live["train.momentum"]])
        live.close()
    (out / f"checkpoint-{rank}.json").write_text(json.dumps({"steps": steps}))
    dist.destroy_process_group()


def _run_ranks(kind: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``python -m tests.test_review_distributed KIND RANK ...`` for two ranks."""
    return _run_two_ranks(kind, tmp_path, module="tests.test_review_distributed")


def test_an_edit_reverted_before_one_node_saw_it_is_not_applied_after_the_revert(
    tmp_path: Path,
) -> None:
    """Rank 0 got lr 0.002 and its revert to 0.001 before the agreement, rank 1 neither:
    both ran 0.001 and rank 0 acknowledged the revert. When rank 1 then got 0.002, the
    ranks applied it: values the operator had reverted, after the revert, and rank 0 went
    back to an older revision (its acks: version 3, then 2)."""
    r0, r1 = _run_ranks("revert", tmp_path)
    assert r0["steps"] == [[1, False, 0.001, 102], [2, False, 0.001, 102], [3, False, 0.001, 102]]
    assert [s[:3] for s in r1["steps"]] == [s[:3] for s in r0["steps"]]
    assert r0["acked"] == [[1, 0], [3, 0]]
    assert r1["acked"][-1] == [3, 0]


def test_an_edit_after_a_checkpoint_from_another_etcd_is_applied_where_local_layers_differ(
    tmp_path: Path,
) -> None:
    """The checkpoint's revision (500) is above any this etcd holds, as after a move to a
    new etcd: the ranks run it, and an edit made then (revision 101, other values on each
    node) is still applied, rank 0's values winning, not held back as older than the
    checkpoint's revision."""
    r0, r1 = _run_ranks("checkpoint", tmp_path)
    assert r0["steps"] == [[2, 0.01, 0.7], [3, True, 0.02, 0.5]]
    assert r1["steps"] == r0["steps"]


if __name__ == "__main__":
    workers = {"revert": revert_worker, "checkpoint": checkpoint_worker}
    workers[sys.argv[1]](int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
