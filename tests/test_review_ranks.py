"""Review of the ranks' agreement (``model_runtime/distributed.py``) by real runs: ranks as
real processes over gloo, each with its own stub daemon, so that what each rank holds at
each call is exact."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_distributed import _run_two_ranks

pytestmark = pytest.mark.timeout(60)

# The short group's timeout: rank 0 waits it out alone once. Its other collectives run
# with both ranks there, which a loaded machine may slow, but not by seconds.
SHORT_TIMEOUT_S = 4


def ranks_worker(rank: int, rdzv: str, out: Path) -> None:
    """Two ranks, each with its own stub daemon, through two user bugs in turn.

    1. Rank 1 calls ``apply`` once more before the loop (a retried call), so from then on
       its calls run one step ahead of rank 0's, and the agreements of the two
       (``sync_every=2``) meet at different steps. A change both hold is waiting.
    2. Rank 0 alone loads a checkpoint (lr 0.5, at the version and revision it runs).
    3. Under a group of both ranks with a short timeout (``new_group``), rank 1 calls
       ``apply`` once fewer than rank 0 and ends, so rank 0's last agreement has no one
       to meet.
    """
    import datetime

    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig
    from tests.daemon_stub import DaemonStub

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    calls: list[list[Any]] = []
    error = ""
    with DaemonStub(str(out / f"steps-{rank}.sock"), {"train": {"lr": 0.001}}) as stub:
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=2)
        pushed = stub.push({"train": {"lr": 0.002}})
        stub.wait_for(lambda: live._received_states()[-1].version == pushed)
        dist.barrier()
        # Equal steps of other types agree: 2.0 is step 2, as in the ack.
        calls.append([live.apply(1), live.apply(2 if rank == 0 else 2.0), live["train.lr"]])
        if rank == 1:
            live.apply(3)  # the extra call
        try:
            for step in range(3, 7):
                calls.append([step, live.apply(step), live["train.lr"]])
        except ValueError as exc:
            error = str(exc)
        live.close()

        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=1)
        if rank == 0:
            saved = live.state_dict()
            saved["values"] = {"train": {"lr": 0.5}}
            live.load_state_dict(saved)
        try:
            partial = [live.apply(1), live["train.lr"]]
        except ValueError as exc:
            partial = [str(exc)]
        live.close()

    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))
    failure: dict[str, Any] = {}
    with DaemonStub(str(out / f"short-{rank}.sock"), {"train": {"lr": 0.001}}) as stub:
        dist.barrier()  # (the default group's timeout) both ranks at the short group's start
        live = LiveConfig.connect(stub.path, timeout=10, process_group=group, sync_every=1)
        try:
            for step in range(1, 4 - rank):
                live.apply(step)
        except Exception as exc:
            failure = {"type": type(exc).__name__, "notes": getattr(exc, "__notes__", [])}
        live.close()
    result = {"calls": calls, "error": error, "partial": partial, "failure": failure}
    (out / f"ranks-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """``ranks_worker``'s results, one run for the tests below (each run of two ranks
    starts two processes that import torch)."""
    out = tmp_path_factory.mktemp("ranks")
    return _run_two_ranks("ranks", out, module="tests.test_review_ranks")


def test_apply_with_other_steps_on_one_rank_raises_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    """Rank 1 called ``apply`` once more than rank 0: its agreements met rank 0's at other
    calls (steps 3 and 4), nothing said so, and each rank acknowledged changes at its own
    step (an extra call late in a run would have met another collective, or hung)."""
    r0, r1 = ranks
    assert r0["calls"][0] == r1["calls"][0] == [False, True, 0.002]
    assert r0["calls"][1:] == [[3, False, 0.002]]
    assert r1["calls"][1:] == []
    for r in (r0, r1):
        assert r["error"].startswith(
            "apply() was given different steps on the ranks at one agreement (from 3 to 4)"
        ), r


def test_a_checkpoint_loaded_on_one_rank_only_raises_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    """Rank 0 alone loaded a checkpoint: at the next agreement it went back to its daemon's
    values and ``apply`` returned True there and False on rank 1 (a loop entering a
    collective on it would hang), nothing saying why."""
    for r in ranks:
        said = str(r["partial"][0])
        assert said.startswith("load_state_dict() was called on some ranks only"), r


def test_a_rank_left_alone_in_an_agreement_is_told_what_it_was_in(
    ranks: list[dict[str, Any]],
) -> None:
    """Rank 0's extra ``apply`` failed with the backend's text alone (a timeout, or the
    peer's connection closed), which names neither hotknob nor ``apply``; the traceback
    went into the collective's internals."""
    r0, r1 = ranks
    assert r1["failure"] == {}
    assert r0["failure"]["type"] in ("RuntimeError", "DistBackendError"), r0
    (note,) = r0["failure"]["notes"]
    assert note.startswith(
        "hotknob: rank 0 was in the ranks' agreement on live config (LiveConfig.connect, "
        "or apply every 1 calls) when it failed: another rank did not reach it"
    ), note
    assert "called apply() fewer times than this one" in note


if __name__ == "__main__":
    workers = {"ranks": ranks_worker}
    workers[sys.argv[1]](int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
