"""The states a rank keeps for the ranks' agreement share what did not change between them.

Each update brings the whole configuration. A rank keeps its last 64 (``_HISTORY``) so
that the ranks can agree on one every rank holds; built anew, each was a whole frozen
copy (hundreds of MiB for a configuration near the protocol's line). Built beside the
state before (``State.build``'s ``like``), a state is the one it would be built anew,
value for value, type for type and key for key in order, sharing every section and leaf
that did not change.
"""

from __future__ import annotations

import gc
import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.protocol import ProtocolError
from hotknob.model_runtime.received import State, same_values, thaw
from tests.daemon_stub import DaemonStub
from tests.test_agreement_fold import world_of_one

pytestmark = pytest.mark.timeout(60)

__all__ = ["world_of_one"]  # a fixture, used by name


def _typed(value: Any) -> str:
    """A text that tells ``1``, ``1.0`` and ``True`` apart, and keeps the keys' order."""
    return json.dumps(value)


def _same_state(got: State, anew: State) -> None:
    assert _typed(thaw(got.values)) == _typed(thaw(anew.values))
    assert list(got.flat) == list(anew.flat)
    assert same_values(got.flat, anew.flat)
    assert got.digest == anew.digest
    assert (got.version, got.revision) == (anew.version, anew.revision)


def _leaf(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(9)
    if kind == 0:
        return rng.randrange(4)
    if kind == 1:
        return float(rng.randrange(4))  # 1.0 beside 1: a change of type
    if kind == 2:
        return rng.random() < 0.5
    if kind == 3:
        return rng.choice(["a", "b", ""])
    if kind == 4:
        return None
    if kind == 5:
        return [rng.randrange(3) for _ in range(rng.randrange(3))]
    if kind == 6:
        return {}  # an empty mapping is a leaf
    if kind == 7 and depth < 3:
        return [{"x": rng.randrange(2)}]  # a list of mappings is a leaf too
    return _section(rng, depth + 1) if depth < 3 else 0


def _section(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    return {f"k{i}": _leaf(rng, depth) for i in rng.sample(range(6), rng.randrange(1, 5))}


def _edit(rng: random.Random, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with one random edit somewhere inside: a value replaced (maybe by a
    section, or a section by a leaf), a key added or removed, or two keys swapped."""
    edited: dict[str, Any] = json.loads(json.dumps(values))
    node = edited
    while True:
        sections = [k for k, v in node.items() if isinstance(v, dict) and v]
        if not sections or rng.random() < 0.4:
            break
        node = node[rng.choice(sections)]
    key = rng.choice(list(node))
    kind = rng.randrange(4)
    if kind == 0:
        node[key] = _leaf(rng, 1)
    elif kind == 1:
        node[f"new{rng.randrange(3)}"] = _leaf(rng, 2)
    elif kind == 2 and len(node) > 1:
        del node[key]
    else:
        items = list(node.items())
        rng.shuffle(items)
        node.clear()
        node.update(items)
    return edited


@pytest.mark.parametrize("seed", range(8))
def test_a_state_built_beside_the_one_before_is_the_one_built_anew(seed: int) -> None:
    rng = random.Random(seed)
    values = _section(rng)
    state = State.build(1, 1, values)
    for n in range(2, 80):
        values = _edit(rng, values) if rng.random() < 0.9 else values
        got = State.build(n, n, values, like=state)
        _same_state(got, State.build(n, n, values))
        state = got


def test_what_did_not_change_is_the_same_object() -> None:
    values: dict[str, Any] = {
        "train": {"lr": 0.1, "momentum": 0.9, "betas": [0.9, 0.99]},
        "data": {"paths": ["a", "b"], "opts": {"shuffle": True, "extra": {}}},
        "seed": 1,
    }
    first = State.build(1, 1, values)
    values["train"]["lr"] = 0.2
    second = State.build(2, 2, values, like=first)
    assert second.values["data"] is first.values["data"]
    assert second.values["train"] is not first.values["train"]
    assert second.values["train"]["betas"] is first.values["train"]["betas"]
    assert second.flat["data.opts.extra"] is first.flat["data.opts.extra"]
    assert second.flat["train.lr"] == 0.2 and first.flat["train.lr"] == 0.1  # the first kept
    # Nothing changed: the values are the state before's, whole.
    third = State.build(3, 3, values, like=second)
    assert third.values is second.values and third.flat == second.flat
    # A change of type is a change: 1 is not 1.0, nor True.
    for seed in (1.0, True):
        values["seed"] = seed
        typed = State.build(4, 4, values, like=third)
        assert type(typed.flat["seed"]) is type(seed)
        assert typed.values["train"] is third.values["train"]


def test_a_value_that_is_not_a_finite_number_is_refused_beside_a_state_too() -> None:
    first = State.build(1, 1, {"train": {"lr": 0.1, "extra": [1.0]}})
    for bad in (
        {"train": {"lr": float("nan"), "extra": [1.0]}},
        {"train": {"lr": 0.1, "extra": [float("inf")]}},
    ):
        with pytest.raises(ProtocolError, match="not a finite number"):
            State.build(2, 2, bad, like=first)


def _wide(lr: float, width: int = 3000) -> dict[str, Any]:
    return {"train": {"lr": lr}, "weights": {f"expert_{i:05d}": 1.0 for i in range(width)}}


def _kept(like: bool) -> int:
    """Bytes held by 64 states of a 3,000-leaf configuration, each one lr apart."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept: list[State] = []
        for n in range(64):
            message = json.loads(json.dumps(_wide(n / 1000)))  # decoded anew, as received
            kept.append(State.build(n, n, message, like=kept[-1] if like and kept else None))
        gc.collect()
        return int(tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()


def test_sixty_four_states_of_a_wide_configuration_share_its_unchanged_section() -> None:
    anew, shared = _kept(like=False), _kept(like=True)
    # Built anew: ~0.7 MB each. Shared: each keeps its own flat dict of pointers (and the
    # section that changed), a fifth of that or less.
    assert anew > 30 * 2**20, anew
    assert shared < anew / 4, (shared, anew)


def test_a_rank_keeps_its_history_of_states_sharing_what_did_not_change(
    world_of_one: None, tmp_path: Path
) -> None:
    with DaemonStub(str(tmp_path / "d.sock"), _wide(0.0)) as stub:
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=1)
        try:
            for n in range(1, 70):
                pushed = stub.push(_wide(n / 1000))
                stub.wait_for(lambda v=pushed: live._received_states()[-1].version == v)
                if n % 10 == 0:
                    assert live.apply(n) is True
                    assert live["train.lr"] == n / 1000
            history = live._received_states()
            assert len(history) == 64
            weights = {id(state.values["weights"]) for state in history}
            assert len(weights) == 1, "each state holds its own copy of the unchanged section"
            assert [s.flat["train.lr"] for s in history] == [n / 1000 for n in range(6, 70)]
            assert live.apply(70) is True
            assert live["train.lr"] == 0.069 and live["weights.expert_02999"] == 1.0
        finally:
            live.close()
