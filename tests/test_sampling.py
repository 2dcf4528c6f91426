"""The defining property of each sampling knob, on real torch tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hotknob.model_runtime.errors import InvalidValue
from hotknob.model_runtime.sampling import SamplingParams, filter_logits, sample

PROPERTY = settings(max_examples=50, deadline=None)


def _logits(batch: int = 3, vocab: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 2.0


def _kept(filtered: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(filtered)


def _entropy(filtered: torch.Tensor) -> torch.Tensor:
    p = filtered.softmax(dim=1)
    return -(p * p.clamp_min(1e-30).log()).sum(dim=1)


logit_rows = st.integers(min_value=0, max_value=2**31 - 1).map(
    lambda seed: _logits(batch=2, vocab=10, seed=seed)
)


# --- parameters ---------------------------------------------------------------------------


def test_from_values_reads_nested_and_flat_and_ignores_unknown() -> None:
    nested = {"sampling": {"top_p": 0.9, "top_k": 5, "bogus": 1}, "train": {"lr": 0.1}}
    assert SamplingParams.from_values(nested) == SamplingParams(top_p=0.9, top_k=5)
    flat = {"sampling.temperature": 0.7, "sampling.min_p": 0.05, "sampling.nope": 3, "x": 1}
    assert SamplingParams.from_values(flat) == SamplingParams(temperature=0.7, min_p=0.05)
    other = {"decode": {"max_new_tokens": 8}}
    assert SamplingParams.from_values(other, section="decode").max_new_tokens == 8
    assert SamplingParams.from_values({}) == SamplingParams()


def test_params_are_checked_and_coerced() -> None:
    assert isinstance(SamplingParams(top_k=3.0).top_k, int)
    assert isinstance(SamplingParams(temperature=1).temperature, float)
    for bad in (
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"top_k": 2.5},
        {"min_p": 1.0},
        {"repetition_penalty": 0.0},
        {"max_new_tokens": 0},
        {"temperature": math.nan},
        {"top_k": math.inf},
        {"max_new_tokens": -math.inf},
        {"top_k": math.nan},
        {"top_k": True},
        {"temperature": "hot"},
        {"max_new_tokens": 10**400},  # too large for a float
        {"temperature": 10**400},
    ):
        with pytest.raises(InvalidValue):
            SamplingParams(**bad)


# --- each knob ----------------------------------------------------------------------------


def test_temperature_zero_is_argmax() -> None:
    logits = _logits(batch=5, vocab=50)
    tokens = sample(logits, SamplingParams(temperature=0.0))
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, logits.argmax(dim=1))
    assert int(_kept(filter_logits(logits, SamplingParams(temperature=0.0))).sum()) == 5


@PROPERTY
@given(logits=logit_rows, k=st.integers(min_value=1, max_value=10), seed=st.integers(0, 2**31))
def test_top_k_support_is_within_the_k_largest(logits: torch.Tensor, k: int, seed: int) -> None:
    params = SamplingParams(top_k=k)
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([sample(logits, params, generator=g) for _ in range(200)], dim=1)
    top = logits.topk(k, dim=1).indices
    for row in range(logits.shape[0]):
        support = set(draws[row].tolist())
        assert support <= set(top[row].tolist())
        assert len(support) <= k
    assert (_kept(filter_logits(logits, params)).sum(dim=1) == k).all()


@PROPERTY
@given(logits=logit_rows, p=st.floats(min_value=0.01, max_value=0.99))
def test_top_p_keeps_the_smallest_set_with_mass_p(logits: torch.Tensor, p: float) -> None:
    kept = _kept(filter_logits(logits, SamplingParams(top_p=p)))
    probs = logits.double().softmax(dim=1)
    tol = 1e-5
    for row in range(logits.shape[0]):
        mass = float(probs[row][kept[row]].sum())
        assert mass >= p - tol
        least = float(probs[row][kept[row]].min())
        assert mass - least < p + tol
        dropped = probs[row][~kept[row]]
        if dropped.numel():  # nothing dropped outranks anything kept
            assert float(dropped.max()) <= least + tol


@PROPERTY
@given(logits=logit_rows, min_p=st.floats(min_value=0.0, max_value=0.95))
def test_min_p_keeps_exactly_the_tokens_above_the_scaled_max(
    logits: torch.Tensor, min_p: float
) -> None:
    kept = _kept(filter_logits(logits, SamplingParams(min_p=min_p)))
    probs = logits.double().softmax(dim=1)
    threshold = min_p * probs.max(dim=1, keepdim=True).values
    assert (probs[kept] >= (threshold.expand_as(probs)[kept] * (1 - 1e-5))).all()
    assert (probs[~kept] < (threshold.expand_as(probs)[~kept] * (1 + 1e-5))).all()
    assert kept.any(dim=1).all()


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.5, -0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    prev = torch.tensor([[0, 1, -1, 99], [4, 4, 2, -7]])  # out of range: padding
    before = logits.softmax(dim=1)
    after = filter_logits(logits, SamplingParams(repetition_penalty=1.5), prev).softmax(dim=1)
    for row, seen in ((0, [0, 1]), (1, [4, 2])):
        unseen = [t for t in range(5) if t not in seen]
        for tok in seen:  # odds against every unseen token fall
            for u in unseen:
                assert after[row, tok] / after[row, u] < before[row, tok] / before[row, u]
    single = filter_logits(logits, SamplingParams(repetition_penalty=1.5), prev[:, :1])
    assert (single.softmax(dim=1).gather(1, prev[:, :1]) < before.gather(1, prev[:, :1])).all()
    out = filter_logits(logits, SamplingParams(repetition_penalty=1.5), prev)
    assert out[0, 0] == pytest.approx(2.0 / 1.5)
    assert out[0, 1] == pytest.approx(-1.5)
    assert out[0, 3] == 1.5  # unseen: untouched
    prev_1d = torch.tensor([3])
    shared = filter_logits(logits, SamplingParams(repetition_penalty=2.0), prev_1d)
    assert shared[:, 3].tolist() == pytest.approx([0.75, 0.2])


def test_repetition_penalty_applies_before_greedy() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, greedy).tolist() == [0]
    assert sample(logits, greedy, prev_tokens=torch.tensor([[0]])).tolist() == [1]


@PROPERTY
@given(logits=logit_rows)
def test_entropy_is_monotone_in_temperature(logits: torch.Tensor) -> None:
    temps = [0.05, 0.3, 1.0, 3.0, 30.0]
    entropies = [_entropy(filter_logits(logits, SamplingParams(temperature=t))) for t in temps]
    for lo, hi in itertools.pairwise(entropies):
        assert (hi >= lo - 1e-6).all()
    vocab = logits.shape[1]
    assert (entropies[-1] > 0.95 * math.log(vocab)).all()  # high: nearly flat
    assert (entropies[0] < entropies[2]).all()  # low: sharper than at 1
    top = [
        filter_logits(logits, SamplingParams(temperature=t)).softmax(1).max(1).values for t in temps
    ]
    for sharp, flat in itertools.pairwise(top):
        assert (sharp >= flat - 1e-6).all()


@pytest.mark.parametrize("temperature", [1e-40, 1e-46, 1e-300])
def test_a_tiny_temperature_samples_the_top_tokens(temperature: float) -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0, -3.0], [1.0, 2.0, 2.0, -math.inf]])
    params = SamplingParams(temperature=temperature)
    filtered = filter_logits(logits, params)
    assert not filtered.isnan().any()
    assert _kept(filtered).tolist() == [[True, False, False, False], [False, True, True, False]]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, params, generator=g) for _ in range(50)])
    assert (draws[:, 0] == 0).all()
    assert set(draws[:, 1].tolist()) == {1, 2}  # a tie at the top stays a tie


def test_temperature_shift_leaves_the_distribution_alone() -> None:
    logits = _logits(batch=3, vocab=20)
    for t in (0.3, 2.5):
        probs = filter_logits(logits, SamplingParams(temperature=t)).softmax(dim=1)
        assert torch.allclose(probs, (logits / t).softmax(dim=1), atol=1e-6)


def test_seeded_generator_is_deterministic() -> None:
    logits = _logits(batch=4, vocab=30)
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.95, min_p=0.01)
    a = [sample(logits, params, torch.Generator().manual_seed(7)) for _ in range(3)]
    g = torch.Generator().manual_seed(7)
    b = [sample(logits, params, g) for _ in range(20)]
    assert all(torch.equal(a[0], x) for x in a)
    assert any(not torch.equal(b[0], x) for x in b[1:])  # the generator advances


def test_batched_shapes_and_dtype() -> None:
    logits = _logits(batch=7, vocab=33).to(torch.float16)
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.2)
    prev = torch.randint(0, 33, (7, 4))
    filtered = filter_logits(logits, params, prev)
    assert filtered.shape == (7, 33) and filtered.dtype == torch.float32
    tokens = sample(logits, params, torch.Generator().manual_seed(0), prev)
    assert tokens.shape == (7,) and tokens.dtype == torch.long
    assert ((tokens >= 0) & (tokens < 33)).all()
    assert _kept(filtered).gather(1, tokens.unsqueeze(1)).all()


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError):
        sample(torch.zeros(5), SamplingParams())
    with pytest.raises(ValueError):
        filter_logits(
            torch.zeros(2, 5), SamplingParams(repetition_penalty=2.0), torch.zeros(3, 1).long()
        )


def test_a_section_inside_another_is_read_from_nested_values() -> None:
    values = {"gen": {"sampling": {"temperature": 0.2, "top_k": 5}}}
    params = SamplingParams.from_values(values, section="gen.sampling")
    assert (params.temperature, params.top_k) == (0.2, 5)


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
def test_a_row_with_no_finite_logit_keeps_its_first_token_at_every_temperature(
    temperature: float,
) -> None:
    logits = torch.tensor([[-math.inf, math.nan, -math.inf]])
    out = filter_logits(logits, SamplingParams(temperature=temperature))
    assert out[0].tolist() == [0.0, -math.inf, -math.inf]


def test_float64_logits_below_float32s_range_saturate_and_are_not_masked() -> None:
    logits = torch.tensor([[-1e301, -1e300, -1e302]], dtype=torch.float64)
    out = filter_logits(logits, SamplingParams(temperature=1.0))
    assert torch.isfinite(out).all(), out  # every token may still be drawn
