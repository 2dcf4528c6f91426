"""Review of the ranks' agreement (``model_runtime/distributed.py``) since its steady state
became one ``all_reduce`` of a fingerprint of each rank's digest, checkpoint vote and step:
four ranks as real processes over gloo, each with its own stub daemon, so that what each
rank holds at each call is exact. Every scenario runs in one run of the four ranks (each
process imports torch once); the tests below check its record."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_distributed import _run_two_ranks

pytestmark = pytest.mark.timeout(60)

WORLD = 4
PLANS = [
    [[1, 2], [3], [], [4, 5, 6], [7], [8]],
    [[1], [2, 3, 4], [5], [6], [8], []],
    [[], [2], [3, 4], [5, 6], [], [7, 8]],
    [[1, 2, 3], [], [4], [6], [7, 8], []],
]
"""The edits (edit ``i``: lr ``0.01 i`` at revision ``1000 + i``) each rank's daemon sends
it in each burst of calls, ``sync_every=3``: at different calls, some skipped (coalesced)."""


def agreement_worker(rank: int, rdzv: str, out: Path) -> None:
    """The scenarios in turn, most as phases: pushes to some ranks' stubs (each rank waits
    until its own got them), a barrier, then calls of ``apply`` with per-rank steps. Each
    call's outcome is recorded as ``[label, result or error, lr, version]``."""
    import numpy as np
    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig
    from tests.daemon_stub import DaemonStub

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    calls: list[list[Any]] = []
    lr = [0.001]
    everyone = tuple(range(WORLD))

    with DaemonStub(str(out / f"agree-{rank}.sock"), {"train": {"lr": 0.001}}) as stub:
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=1)

        def push(on: tuple[int, ...] = everyone, value: float | None = None) -> None:
            if value is None:
                lr[0] = value = round(lr[0] + 0.001, 6)
            if rank in on:
                pushed = stub.push({"train": {"lr": value}})
                stub.wait_for(lambda: live._received_states()[-1].version == pushed)

        def call(label: str, step: Any) -> None:
            try:
                result: Any = live.apply(step)
            except ValueError as exc:
                result = "ValueError: " + str(exc)[:60]
            calls.append([label, result, live["train.lr"], live.version])

        def phase(label: str, steps: list[Any], group: Any = None) -> None:
            dist.barrier(group)
            for i, step in enumerate(steps):
                call(f"{label}.{i}", step)

        phase("steady", [1, 2])
        push()
        phase("all-hold", [3, 4])
        # Steps of other types that are the same integers; steps that are no integer.
        push()
        phase("float-step", [5 if rank % 2 else 5.0, 6])
        push()
        phase("numpy-step", [np.int64(7) if rank == 1 else 7, np.int32(8)])
        push()
        phase("string-all", ["x", "y"])
        push()
        phase("string-some", ["x" if rank == 3 else 11, 12])
        # One rank a step ahead, with a change waiting.
        push()
        phase("ahead", [14 if rank == 2 else 13])
        phase("after-ahead", [15])
        # A change that reaches ranks 0 and 1 first.
        push(on=(0, 1))
        phase("half", [16, 17])
        push(on=(2, 3), value=lr[0])
        phase("rest", [18])
        # A checkpoint loaded on every rank, newer than every daemon's state (vote 1)...
        saved = live.state_dict()
        saved["values"] = {"train": {"lr": 0.5}}
        live.load_state_dict(saved)
        phase("ck-vote1", [19, 20])
        push()
        phase("ck-vote1-edit", [21])
        # ... older than every daemon's (vote 2).
        saved = {**live.state_dict(), "version": 1, "revision": 100}
        saved["values"] = {"train": {"lr": 0.6}}
        live.load_state_dict(saved)
        phase("ck-vote2", [22, 23])
        # Rank 2's daemon restarts without its state dir: the same values, at version 1.
        if rank == 2:
            stub.stop()
            stub.version = 1
            stub.start()
            stub.wait_for(lambda: live._received_states()[-1].version == 1)
        phase("restart", [24, 25])
        # Rank 3's daemon restarts with an edit made while it was down; the others' get it.
        lr[0] = round(lr[0] + 0.001, 6)
        if rank == 3:
            stub.stop()
            stub.version += 10
            stub.revision += 1
            stub.values = {"train": {"lr": lr[0]}}
            stub.start()
            stub.wait_for(lambda: live._received_states()[-1].version == stub.version)
        phase("restart-edit", [26, 27])
        push(on=(0, 1, 2), value=lr[0])
        phase("restart-edit-rest", [28])
        # Votes 1 and 2: the checkpoint is at version 12, which only rank 3's daemon passed.
        saved = {**live.state_dict(), "version": 12}
        saved["values"] = {"train": {"lr": 0.7}}
        live.load_state_dict(saved)
        phase("ck-mixed", [29, 30])
        # Rank 0 alone loads it; then every rank does.
        if rank == 0:
            live.load_state_dict(saved)
        phase("ck-some", [31, 32])
        live.load_state_dict(saved)
        phase("ck-all-again", [33, 34])
        stub.wait_for(lambda: stub.messages("applied")[-1]["step"] == 33)
        acked = [[m["version"], m["step"]] for m in stub.messages("applied")]
        live.close()

        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=3)
        step = 100
        for burst in range(6):
            for edit in PLANS[rank][burst]:
                stub.revision = 1000 + edit - 1
                push(on=(rank,), value=round(0.01 * edit, 6))
            dist.barrier()
            for _ in range(2 + burst % 2):
                step += 1
                call(f"every3.{burst}", step)
                calls[-1].append(live.revision)
        stub.wait_for(lambda: stub.messages("applied")[-1]["step"] == 115)
        acked_every3 = [[m["version"], m["step"]] for m in stub.messages("applied")]
        live.close()

        # Rank 1's on_change callback calls apply (refused or a no-op) when armed: in an
        # agreement, then in a checkpoint load. No collective between the calls, and every
        # call at step 7 (an epoch, say).
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=2)
        nested: list[Any] = []
        armed: list[bool] = []
        if rank == 1:

            def calls_apply(value: float) -> None:
                if armed:
                    armed.pop()
                    try:
                        nested.append(live.apply(7))
                    except RuntimeError as exc:
                        nested.append(str(exc)[:40])

            live.on_change("train.lr", calls_apply)
        armed.append(True)
        push()
        dist.barrier()
        for i in range(6):
            if i == 2:
                push()
            call(f"nested.{i}", 7)
        saved = live.state_dict()
        saved["values"] = {"train": {"lr": 0.9}}
        armed.append(True)
        live.load_state_dict(saved)
        push()
        for i in range(4):
            call(f"nested-load.{i}", 7)
        live.close()

    # A process group of ranks 1 to 3; rank 0 is not in it.
    group = dist.new_group([1, 2, 3])
    if rank > 0:
        with DaemonStub(str(out / f"sub-{rank}.sock"), {"train": {"lr": 0.001}}) as stub:
            live = LiveConfig.connect(stub.path, timeout=10, process_group=group, sync_every=2)
            lr[0] = 0.001
            push(on=(1, 2))
            phase("sub-half", [1, 2], group)
            push(on=(3,), value=lr[0])
            phase("sub-rest", [3, 4 if rank != 2 else 4.0], group)
            push()
            phase("sub-ahead", [5, 6 if rank != 3 else 7], group)
            live.close()
    dist.barrier()
    result = {"calls": calls, "acked": acked, "acked_every3": acked_every3, "nested": nested}
    (out / f"agreement-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """``agreement_worker``'s results, one run of four ranks for the tests below."""
    out = tmp_path_factory.mktemp("agreement")
    return _run_two_ranks("agreement", out, world=WORLD, module="tests.test_review_agreement")


def _calls(result: dict[str, Any], prefix: str) -> list[list[Any]]:
    """``[label, result, lr]`` of the calls whose label starts with ``prefix``."""
    return [c[:3] for c in result["calls"] if c[0].startswith(prefix)]


def _same_everywhere(ranks: list[dict[str, Any]], prefix: str) -> list[list[Any]]:
    """The calls under ``prefix``, asserted the same (results, errors, lr) on every rank."""
    first = _calls(ranks[0], prefix)
    for r, result in enumerate(ranks):
        assert _calls(result, prefix) == first, (r, prefix)
    return first


def test_steps_of_other_types_agree_and_a_rank_ahead_raises_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    assert _same_everywhere(ranks, "steady") == [
        ["steady.0", False, 0.001],
        ["steady.1", False, 0.001],
    ]
    for prefix, lr in [
        ("all-hold", 0.002),
        ("float-step", 0.003),
        ("numpy-step", 0.004),
        ("string-all", 0.005),
        ("string-some", 0.006),
    ]:
        calls = _same_everywhere(ranks, prefix)
        assert [c[1:] for c in calls] == [[True, lr], [False, lr]], calls
    ((_, error, lr),) = _same_everywhere(ranks, "ahead")
    assert error.startswith("ValueError: apply() was given different steps") and lr == 0.006
    # Nothing was left in a collective: the next call applies the waiting change.
    assert _same_everywhere(ranks, "after-ahead") == [["after-ahead.0", True, 0.007]]
    # Acks carry the integer step, also where it was passed as 5.0 or np.int64(7).
    assert all([4, 7] in r["acked"] and [3, 5] in r["acked"] for r in ranks)


def test_a_change_is_applied_once_every_rank_holds_it(ranks: list[dict[str, Any]]) -> None:
    assert [c[1:] for c in _same_everywhere(ranks, "half")] == [[False, 0.007]] * 2
    assert [c[1:] for c in _same_everywhere(ranks, "rest.")] == [[True, 0.008]]


def test_checkpoints_votes_agree_or_raise_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    assert [c[1:] for c in _same_everywhere(ranks, "ck-vote1.")] == [[False, 0.5]] * 2
    assert [c[1:] for c in _same_everywhere(ranks, "ck-vote1-edit")] == [[True, 0.009]]
    assert [c[1:] for c in _same_everywhere(ranks, "ck-vote2")] == [[True, 0.009], [False, 0.009]]
    assert [c[1:] for c in _same_everywhere(ranks, "ck-mixed")] == [[True, 0.01], [False, 0.01]]
    some = [_calls(r, "ck-some") for r in ranks]
    for calls in some:  # raised on every rank, at both agreements (the vote stays)
        assert [
            c[1].startswith("ValueError: load_state_dict() was called on some") for c in calls
        ] == [True, True]
    assert [c[1:] for c in _same_everywhere(ranks, "ck-all-again")] == [[True, 0.01], [False, 0.01]]


def test_a_restarted_daemon_renumbers_without_a_change_on_any_rank(
    ranks: list[dict[str, Any]],
) -> None:
    assert [c[1:] for c in _same_everywhere(ranks, "restart.")] == [[False, 0.009]] * 2
    assert [c[1:] for c in _same_everywhere(ranks, "restart-edit.")] == [[False, 0.009]] * 2
    assert [c[1:] for c in _same_everywhere(ranks, "restart-edit-rest")] == [[True, 0.01]]
    # Rank 2 took its daemon's version 1 in, acknowledged at the step the values were
    # applied; rank 3 runs its restarted daemon's version of the edit.
    assert ranks[2]["acked"][ranks[2]["acked"].index([9, 22]) + 1] == [1, 22]
    assert [c[3] for c in ranks[3]["calls"] if c[0] == "restart-edit-rest.0"] == [19]


def test_many_changes_at_sync_every_3_move_every_rank_together(
    ranks: list[dict[str, Any]],
) -> None:
    calls = _same_everywhere(ranks, "every3")
    lrs = [lr for _, _, lr in calls]
    # The agreements (calls 3, 6, 9, 12, 15) settle on the newest edit every rank holds.
    assert lrs == [0.01] * 2 + [0.02] * 3 + [0.03] * 3 + [0.06] * 6 + [0.08]
    for result in ranks:
        revisions = [c[4] for c in result["calls"] if c[0].startswith("every3")]
        assert revisions == sorted(revisions)
        assert [step for _, step in result["acked_every3"][-4:]] == [103, 106, 109, 115]


def test_a_process_group_of_some_ranks(ranks: list[dict[str, Any]]) -> None:
    assert _calls(ranks[0], "sub-") == []
    sub = ranks[1:]
    assert [c[1:] for c in _same_everywhere(sub, "sub-half")] == [[False, 0.001]] * 2
    assert [c[1:] for c in _same_everywhere(sub, "sub-rest")] == [[False, 0.001], [True, 0.002]]
    ahead = _same_everywhere(sub, "sub-ahead")
    assert ahead[0][1:] == [False, 0.002]
    assert ahead[1][1].startswith("ValueError: apply() was given different steps")


def test_an_apply_from_a_callback_does_not_move_the_ranks_agreements(
    ranks: list[dict[str, Any]],
) -> None:
    """Rank 1's callback called ``apply`` during the agreement at call 2: that call counted
    in rank 1's countdown, so its agreements came one call before the others' from then on.
    The next change was applied at call 3 on rank 1 and at call 4 on the others. With a
    collective between the calls (a barrier; DDP's in training), rank 1's agreement met
    that collective instead, and both ranks hung. A callback's call during a checkpoint
    load moved the countdown the same way."""
    assert ranks[1]["nested"] == [False, False]  # not an agreement call: nothing to apply
    calls = _same_everywhere(ranks, "nested.")
    assert [applied for _, applied, _ in calls] == [False, True, False, True, False, False]
    assert [lr for _, _, lr in calls] == [0.08, 0.011, 0.011, 0.012, 0.012, 0.012]
    # The same from a checkpoint load's callbacks, and a change waiting after it.
    calls = _same_everywhere(ranks, "nested-load")
    assert [c[1:] for c in calls] == [[False, 0.9], [True, 0.013], [False, 0.013], [False, 0.013]]


@pytest.mark.parametrize("distributed", [False, True])
def test_a_huge_fraction_step_is_no_step_not_an_overflow(tmp_path: Path, distributed: bool) -> None:
    """``step_number`` of ``Fraction(10**400)`` raises ``OverflowError`` (its ``float()``):
    it escaped ``apply`` after the values had changed, unacknowledged; under a group it was
    raised before the agreement's collective, on that rank alone, leaving the others there."""
    from fractions import Fraction

    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig
    from tests.daemon_stub import DaemonStub

    if distributed:
        rdzv = f"file://{tmp_path / 'rdzv'}"
        dist.init_process_group("gloo", init_method=rdzv, rank=0, world_size=1)
    every = 1 if distributed else None
    try:
        with (
            DaemonStub(str(tmp_path / "d.sock"), {"train": {"lr": 0.001}}) as stub,
            LiveConfig.connect(
                stub.path, timeout=10, distributed=distributed, sync_every=every
            ) as live,
        ):
            pushed = stub.push({"train": {"lr": 0.002}})
            stub.wait_for(lambda: live._received_states()[-1].version == pushed)
            assert live.apply(Fraction(10**400)) is True
            assert live["train.lr"] == 0.002
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    workers = {"agreement": agreement_worker}
    workers[sys.argv[1]](int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
