"""sample() over the extremes of every accepted value, and the live-value rules
(None means "off", a removed key keeps the value in force with a warning)."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

from hotknob.model_runtime.errors import InvalidValue
from hotknob.model_runtime.sampling import SamplingParams, filter_logits, sample

TEMPERATURES = (0.0, 5e-324, 1e-40, 1e-3, 1.0, 7.0, 1e39, 1e300, 1.7e308)
PENALTIES = (5e-324, 1e-40, 1e-3, 1.0, 1e3, 1e39, 1e300)
TOP_P = (1e-300, 0.5, 1.0)
TOP_K = (0, 1, 3, 10**6, 10**300)
MIN_P = (0.0, 0.5, 0.999999)


def _logit_rows() -> torch.Tensor:
    inf = math.inf
    return torch.tensor(
        [
            [2.0, 1.0, -1.0, 0.5, 0.0],
            [-1.0, -2.0, -3.0, -4.0, -5.0],  # all negative
            [3.0e38, -3.0e38, 1.0, -inf, 0.0],  # float32's range, and masked
            [-inf, -inf, 5.0, -inf, -inf],  # one unmasked token
            [1e-30, 0.0, -1e-30, 0.0, 1e-30],
        ]
    )


@pytest.mark.parametrize(
    ("temperature", "penalty"), list(itertools.product(TEMPERATURES, PENALTIES))
)
def test_extreme_temperature_and_penalty_always_draw_a_valid_unmasked_token(
    temperature: float, penalty: float
) -> None:
    logits = _logit_rows()
    prev = torch.tensor([[0, 1, 2, 3, 4]] * logits.shape[0])  # every token seen
    g = torch.Generator().manual_seed(0)
    for top_p, top_k, min_p in itertools.product(TOP_P, TOP_K, MIN_P):
        params = SamplingParams(
            temperature=temperature,
            repetition_penalty=penalty,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
        )
        filtered = filter_logits(logits, params, prev)
        assert not filtered.isnan().any() and not (filtered == math.inf).any()
        assert (filtered > -math.inf).any(dim=1).all()  # no row is empty
        tokens = sample(logits, params, g, prev)
        assert tokens.shape == (logits.shape[0],)
        assert ((tokens >= 0) & (tokens < logits.shape[1])).all()
        assert (logits.gather(1, tokens[:, None]) > -math.inf).all()  # never a masked one
        assert tokens[3] == 2


def test_a_huge_temperature_flattens_but_keeps_masked_tokens_out() -> None:
    logits = torch.tensor([[2.0, -math.inf, 1.0]])
    for t in (1e39, 1e300):
        filtered = filter_logits(logits, SamplingParams(temperature=t))
        assert filtered[0, 1] == -math.inf and not filtered.isnan().any()
        draws = {int(sample(logits, SamplingParams(temperature=t))[0]) for _ in range(50)}
        assert draws <= {0, 2}


def test_a_huge_penalty_on_an_all_seen_negative_row_keeps_a_token() -> None:
    logits = torch.tensor([[-1.0, -2.0, -3.0]])
    params = SamplingParams(repetition_penalty=1e39)
    assert int(sample(logits, params, None, torch.tensor([0, 1, 2]))[0]) in (0, 1, 2)
    greedy = SamplingParams(repetition_penalty=1e39, temperature=0)
    assert int(sample(logits, greedy, None, torch.tensor([1, 2]))[0]) == 0


def test_a_tiny_penalty_keeps_the_penalized_order_finite() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    params = SamplingParams(repetition_penalty=1e-40, temperature=0.7)
    filtered = filter_logits(logits, params, torch.tensor([0, 1, 2, 3]))
    assert not filtered.isnan().any() and (filtered > -math.inf).sum() >= 1
    sample(logits, params, torch.Generator().manual_seed(0), torch.tensor([0, 1, 2, 3]))


def test_nan_and_inf_logits_and_an_all_masked_row() -> None:
    logits = torch.tensor([[math.nan, 1.0, math.inf], [-math.inf] * 3, [math.nan] * 3])
    for params in (SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_p=0.5)):
        tokens = sample(logits, params, torch.Generator().manual_seed(0))
        assert tokens[0] == 2 and tokens[1] == 0 and tokens[2] == 0


def test_none_means_off_where_a_knob_has_an_off_value() -> None:
    values = {"sampling": {"top_p": None, "top_k": None, "min_p": None, "temperature": 0.5}}
    params = SamplingParams.from_values(values)
    assert params == SamplingParams(temperature=0.5, top_p=1.0, top_k=0, min_p=0.0)
    assert SamplingParams.from_values({"sampling.repetition_penalty": None}).repetition_penalty == 1
    for key in ("temperature", "max_new_tokens"):
        with pytest.raises(InvalidValue, match=f"sampling.{key}"):
            SamplingParams.from_values({"sampling": {key: None}})


def test_a_missing_key_keeps_the_base_value_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    base = SamplingParams(top_k=40, temperature=0.8)
    with caplog.at_level(logging.WARNING, logger="hotknob.model_runtime.sampling"):
        params = SamplingParams.from_values(
            {"sampling": {"temperature": 0.3}}, base=base, warn_missing=True
        )
    assert params == SamplingParams(top_k=40, temperature=0.3)
    assert "key=sampling.top_k using=40" in caplog.text
    assert "sampling.temperature" not in caplog.text
