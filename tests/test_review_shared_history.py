"""Review of the states a rank keeps (``State.build``'s ``like``) by real runs: each state,
built beside the one before, must hold exactly the daemon's values, and the states kept
must share what did not change, held restart-only keys or not."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.received import State, thaw, with_held
from tests.daemon_stub import DaemonStub
from tests.test_agreement_fold import world_of_one
from tests.test_distributed import _run_two_ranks

pytestmark = pytest.mark.timeout(60)

__all__ = ["world_of_one"]  # a fixture, used by name


def _typed(values: Any) -> str:
    """A text that tells ``1``, ``1.0``, ``True``, ``0.0`` and ``-0.0`` apart, and keeps
    the keys' order."""
    return json.dumps(values)


def _flat_typed(flat: dict[str, Any]) -> str:
    return repr([(key, type(value).__name__, repr(value)) for key, value in flat.items()])


def test_a_state_beside_the_one_before_keeps_the_sign_of_a_zero_and_the_order_of_keys() -> None:
    """``-0.0 == 0.0`` and mappings compare without order, so a state built beside one
    that held ``0.0`` kept ``0.0`` where the daemon sent ``-0.0`` (its digest then differed
    from another rank's, which built it anew), and a mapping inside a list kept its old
    key order. Nor may an older state change once kept."""
    values: dict[str, Any] = {
        "train": {"zero": 0.0, "betas": [0.0, 0.9], "layers": [{"a": 1, "b": 2}], "x": 1},
        "data": {"paths": ["a"], "extra": {}},
    }
    kept = [State.build(1, 1, values)]
    seen = [(_typed(thaw(kept[0].values)), _flat_typed(kept[0].flat), kept[0].digest)]
    edits = [
        ("zero", -0.0),
        ("zero", 1.0),
        ("zero", 0.0),
        ("zero", -1.0),
        ("zero", -0.0),
        ("betas", [-0.0, 0.9]),
        ("betas", [1.0, 0.9]),
        ("betas", [0.0, 0.9]),
        ("layers", [{"b": 2, "a": 1}]),
        ("x", 1.0),
        ("x", True),
        ("x", 0.0),
        ("layers", [{"b": 2, "a": 1}, {}]),
    ]
    for n, (key, value) in enumerate(edits, start=2):
        values = json.loads(json.dumps(values))  # decoded anew, as received
        values["train"][key] = value
        got = State.build(n, n, values, like=kept[-1])
        anew = State.build(n, n, values)
        assert _typed(thaw(got.values)) == _typed(values) == _typed(thaw(anew.values)), key
        assert _flat_typed(got.flat) == _flat_typed(anew.flat), key
        assert got.digest == anew.digest, key
        assert got.values["data"] is kept[-1].values["data"]  # what did not change is shared
        kept.append(got)
        seen.append((_typed(thaw(got.values)), _flat_typed(got.flat), got.digest))
    assert [math.copysign(1.0, s.flat["train.zero"]) for s in kept[:6]] == [1, -1, 1, 1, -1, -1]
    assert [(_typed(thaw(s.values)), _flat_typed(s.flat), s.digest) for s in kept] == seen


@pytest.mark.parametrize("seed", range(4))
def test_numbers_of_every_sign_and_type_are_the_ones_built_anew(seed: int) -> None:
    """Floats equal to one another but for a zero's sign, ints and bools equal to them, in
    leaves and in lists, from one state to the next."""
    rng = random.Random(seed)
    numbers = [0.0, -0.0, 1.0, -1.0, 0, 1, True, False]
    state = State.build(1, 1, {"a": {"x": 0.0, "l": [0.0]}, "b": {"y": 1}})
    for n in range(2, 200):
        values = {
            "a": {"x": rng.choice(numbers), "l": [rng.choice(numbers) for _ in range(2)]},
            "b": {"y": 1},
        }
        got = State.build(n, n, values, like=state)
        anew = State.build(n, n, values)
        assert _typed(thaw(got.values)) == _typed(values) == _typed(thaw(anew.values))
        assert _flat_typed(got.flat) == _flat_typed(anew.flat)
        assert got.digest == anew.digest
        state = got


def test_a_held_state_shares_with_the_state_it_holds_a_key_of() -> None:
    """A state with a restart-only key held (``with_held``, on every update once the daemon's
    value differs from the one the process runs) was built anew, whole: a rank's 64 kept
    states each held a copy of every section."""
    values = {"train": {"lr": 0.1, "batch_size": 64}, "weights": {f"w{i}": 1.0 for i in range(50)}}
    state = State.build(2, 2, values)
    held = with_held(state, {"train.batch_size": 32})
    assert held.held == ("train.batch_size",)
    assert held.flat["train.batch_size"] == 32 and state.flat["train.batch_size"] == 64
    assert held.values["weights"] is state.values["weights"]
    assert _typed(thaw(held.values)) == _typed(
        {"train": {"lr": 0.1, "batch_size": 32}, "weights": values["weights"]}
    )
    assert list(held.flat) == list(state.flat)


def _wide(lr: float, batch_size: int) -> dict[str, Any]:
    return {
        "train": {"lr": lr, "batch_size": batch_size},
        "weights": {f"expert_{i:04d}": 1.0 for i in range(500)},
    }


def test_a_rank_holding_a_restart_only_key_keeps_its_history_shared(
    world_of_one: None, tmp_path: Path
) -> None:
    """Once a restart-only ``set`` is held, every later state a rank keeps is a held one:
    each was a whole copy, so the history cost 64 configurations again."""
    restart_only = ("train.batch_size",)
    with DaemonStub(str(tmp_path / "d.sock"), _wide(0.0, 32), restart_only=restart_only) as stub:
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=1)
        try:
            for n in range(1, 12):
                pushed = stub.push(_wide(n / 100, 64))
                stub.wait_for(lambda v=pushed: live._received_states()[-1].version == v)
            history = live._received_states()[1:]
            assert all(s.held == restart_only for s in history)
            assert len({id(s.values["weights"]) for s in history}) == 1
            assert [s.flat["train.batch_size"] for s in history] == [32] * 11
            assert live.apply(1) is True
            assert (live["train.lr"], live["train.batch_size"]) == (0.11, 32)
        finally:
            live.close()


def zeros_worker(rank: int, rdzv: str, out: Path) -> None:
    """Two ranks, each with its own stub daemon, the same state at the end (revision 102),
    reached through another state before it: rank 0's held ``0.0`` and the list's mapping
    in the old key order, rank 1's neither."""
    import logging

    import torch.distributed as dist

    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hotknob.model_runtime").addHandler(handler)

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    first = {"train": {"lr": 0.1, "zero": 1.0, "layers": [{"a": 1, "b": 2}]}}
    last = {"train": {"lr": 0.2, "zero": -0.0, "layers": [{"b": 2, "a": 1}]}}
    if rank == 0:
        between = {"train": {"lr": 0.1, "zero": 0.0, "layers": [{"a": 1, "b": 2}]}}
    else:
        between = {"train": {"lr": 0.1, "zero": 1.0, "layers": [{"b": 2, "a": 1}]}}
    with DaemonStub(str(out / f"zeros-{rank}.sock"), first) as stub:
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=1)
        try:
            stub.push(between)
            pushed = stub.push(last)
            stub.wait_for(lambda: live._received_states()[-1].version == pushed)
            dist.barrier()
            applied = live.apply(1)
            result = {
                "applied": applied,
                "values": _typed(live.state_dict()["values"]),
                "sign": math.copysign(1.0, live["train.zero"]),
                "warned": warned,
            }
        finally:
            live.close()
    (out / f"zeros-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_ranks_apply_a_negative_zero_and_a_reordered_mapping_as_their_daemons_sent_them(
    tmp_path: Path,
) -> None:
    """Rank 0 kept ``0.0`` and the old key order beside its state before: its digest
    differed from rank 1's for the same values at the same revision, the ranks took their
    daemons for node-local layers that differ (``live_ranks_disagree``) and rank 1 applied
    rank 0's wrong values in place of its daemon's."""
    expected = _typed({"train": {"lr": 0.2, "zero": -0.0, "layers": [{"b": 2, "a": 1}]}})
    for r in _run_two_ranks("zeros", tmp_path, module="tests.test_review_shared_history"):
        assert r["applied"] is True
        assert r["values"] == expected
        assert r["sign"] == -1.0
        assert r["warned"] == []


if __name__ == "__main__":
    workers = {"zeros": zeros_worker}
    workers[sys.argv[1]](int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
