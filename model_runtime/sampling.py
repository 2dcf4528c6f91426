"""Reference token sampling driven by live ``sampling.*`` values.

:func:`filter_logits` applies, in this order and batched over rows: the
repetition penalty (CTRL-style, on tokens in ``prev_tokens``), temperature
(0 means greedy: only the argmax survives), top-k, top-p, min-p. Dropped
tokens are ``-inf``. :func:`sample` draws one token per row from the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidValue

__all__ = ["SamplingParams", "filter_logits", "sample"]

_F32_TINY = 2.0**-149  # float32's smallest positive value: smaller rounds to 0 there


@dataclass(frozen=True)
class SamplingParams:
    """One consistent set of sampling knobs; ranges are checked on construction.

    ``top_k == 0`` and ``top_p == 1`` and ``min_p == 0`` and
    ``repetition_penalty == 1`` each mean "off".
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want = int if f.type in (int, "int") else float
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise InvalidValue(f"sampling.{f.name}: expected a number, got {v!r}")
            try:
                finite = math.isfinite(v)
            except OverflowError:
                raise InvalidValue(
                    f"sampling.{f.name}: expected a finite number, got an integer too large "
                    "for a float"
                ) from None
            if not finite:
                raise InvalidValue(f"sampling.{f.name}: expected a finite number, got {v!r}")
            if want is int and v != int(v):
                raise InvalidValue(f"sampling.{f.name}: expected an integer, got {v!r}")
            object.__setattr__(self, f.name, want(v))
        checks = (
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("max_new_tokens", self.max_new_tokens > 0, "> 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise InvalidValue(f"sampling.{name}: must be {rule}, got {getattr(self, name)!r}")

    @classmethod
    def from_values(cls, values: Mapping[str, Any], section: str = "sampling") -> SamplingParams:
        """Build from nested (``{"sampling": {...}}``) or flat (``{"sampling.top_p": ...}``)
        values; unknown keys are ignored, missing ones keep their defaults. A flat key
        wins over the same key nested."""
        known = {f.name for f in fields(cls)}
        found: dict[str, Any] = {}
        nested = values.get(section)
        if isinstance(nested, Mapping):
            found.update({k: v for k, v in nested.items() if k in known})
        prefix = section + "."
        for key, v in values.items():
            if isinstance(key, str) and key.startswith(prefix) and key[len(prefix) :] in known:
                found[key[len(prefix) :]] = v
        return cls(**found)


def _penalize(logits: Tensor, prev_tokens: Tensor, penalty: float) -> Tensor:
    if prev_tokens.dim() == 1:
        prev_tokens = prev_tokens.unsqueeze(0).expand(logits.shape[0], -1)
    if prev_tokens.dim() != 2 or prev_tokens.shape[0] != logits.shape[0]:
        raise ValueError(
            f"prev_tokens must be [batch, seq] or [seq], got {tuple(prev_tokens.shape)} "
            f"for logits {tuple(logits.shape)}"
        )
    vocab = logits.shape[1]
    prev = prev_tokens.to(device=logits.device, dtype=torch.long)
    prev = torch.where((prev >= 0) & (prev < vocab), prev, vocab)  # a spare column takes padding
    seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    seen = seen.scatter_(1, prev, True)[:, :vocab]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _keep_only(logits: Tensor, keep: Tensor) -> Tensor:
    return logits.masked_fill(~keep, -math.inf)


def filter_logits(
    logits: Tensor, params: SamplingParams, prev_tokens: Tensor | None = None
) -> Tensor:
    """The float32 logits ``[batch, vocab]`` that :func:`sample` draws from; dropped tokens
    are ``-inf`` and every row keeps at least one token. With a temperature other than 1
    each row is shifted so that its largest logit is 0.

    ``prev_tokens`` (``[batch, seq]`` or ``[seq]``, long) names already generated tokens
    for the repetition penalty; ids outside ``[0, vocab)`` (padding) are ignored.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got {tuple(logits.shape)}")
    out = logits.float()
    vocab = out.shape[1]
    if prev_tokens is not None and params.repetition_penalty != 1.0:
        out = _penalize(out, prev_tokens, params.repetition_penalty)
    if params.temperature == 0:
        top = out.argmax(dim=1, keepdim=True)
        return _keep_only(out, torch.zeros_like(out, dtype=torch.bool).scatter_(1, top, True))
    if params.temperature != 1.0:
        # Each row's max goes to 0 first (the softmax and every filter below are unchanged
        # by the shift), so a tiny temperature sends the other tokens to -inf rather than
        # the top ones to +inf, where the softmax turns them into nan.
        out = out - out.amax(dim=1, keepdim=True)
        if params.temperature >= _F32_TINY:
            out = out / params.temperature
        else:  # it would round to 0 in float32, and the max's 0 / 0 be nan: take the limit
            out = out.masked_fill(out < 0, -math.inf)
    if 0 < params.top_k < vocab:
        idx = out.topk(params.top_k, dim=1).indices
        out = _keep_only(out, torch.zeros_like(out, dtype=torch.bool).scatter_(1, idx, True))
    if params.top_p < 1.0:
        probs, order = out.softmax(dim=1).sort(dim=1, descending=True)
        mass_before = probs.cumsum(dim=1) - probs
        keep_sorted = mass_before < params.top_p
        keep_sorted[:, 0] = True
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        out = _keep_only(out, keep)
    if params.min_p > 0.0:
        top = out.max(dim=1, keepdim=True).values
        out = _keep_only(out, out >= top + math.log(params.min_p))
    return out


def sample(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    prev_tokens: Tensor | None = None,
) -> Tensor:
    """Draw one token id per row (``[batch]``, long). Temperature 0 is the argmax after the
    repetition penalty and consumes no randomness; otherwise a seeded ``generator`` makes
    the draw reproducible."""
    filtered = filter_logits(logits, params, prev_tokens)
    if params.temperature == 0:
        return filtered.argmax(dim=1)
    probs = filtered.softmax(dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
