"""The ranks' agreement in the steady state is one collective of two int64.

gloo's ``all_reduce`` on a few ranks takes longer the more elements it carries (on four
ranks of a two-core machine, ~0.8 ms for two, ~4 ms for six), and the steady state is
what a training job pays every ``sync_every`` steps. Each rank folds its digest, its
checkpoint vote and its step into one fingerprint; the whole six (what tells which
differs) go only when the fingerprints differ, which the two-rank tests in
``test_review_ranks.py`` drive (other steps, a checkpoint on one rank only)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from hotknob.model_runtime import LiveConfig  # noqa: E402
from hotknob.model_runtime.distributed import _NO_STEP, _fold  # noqa: E402
from tests.daemon_stub import DaemonStub  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def test_the_fingerprint_tells_each_of_the_three_apart() -> None:
    base = _fold(123456789, 0, 40)
    assert base == _fold(123456789, 0, 40)
    f, neg = base
    assert neg == -f and 0 <= f < 2**63
    others = [
        _fold(123456788, 0, 40),  # other values
        _fold(123456789, 1, 40),  # a checkpoint loaded here
        _fold(123456789, 2, 40),
        _fold(123456789, 0, 41),  # another step
        _fold(123456789, 0, _NO_STEP),  # no integer step
        _fold(2**63 - 1, 0, 40),
    ]
    assert len({o[0] for o in [base, *others]}) == len(others) + 1


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[None]:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_steady_agreement_sends_two_int64(
    world_of_one: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist

    sizes: list[int] = []
    real = dist.all_reduce

    def counted(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counted)
    with DaemonStub(str(tmp_path / "d.sock"), {"train": {"lr": 0.001}}) as stub:
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=1)
        try:
            sizes.clear()  # what connect agreed on (sync_every, the first state)
            assert live.apply(1) is False
            pushed = stub.push({"train": {"lr": 0.002}})
            stub.wait_for(lambda: live._received_states()[-1].version == pushed)
            assert live.apply(2) is True
            assert live["train.lr"] == 0.002
            saved = live.state_dict()
            saved["values"] = {"train": {"lr": 0.5}}
            live.load_state_dict(saved)
            assert live.apply(3) is False  # the checkpoint stays (it is the newest here)
            assert live["train.lr"] == 0.5
            assert live.apply(4.0) is False  # a float step is step 4
            assert sizes == [2, 2, 2, 2], sizes
        finally:
            live.close()
