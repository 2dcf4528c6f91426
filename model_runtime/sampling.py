"""Reference token sampling driven by live ``sampling.*`` values.

:func:`filter_logits` applies, in this order and batched over rows: the
repetition penalty (CTRL-style, on tokens in ``prev_tokens``), temperature
(0 means greedy: only the argmax survives), top-k, top-p, min-p. Dropped
tokens are ``-inf``. :func:`sample` draws one token per row from the result.

Numerics: every value :class:`SamplingParams` accepts is safe. The penalty and
the temperature are computed in float64 and clamped to float32's finite range,
so a tiny or huge penalty or temperature saturates instead of giving
``inf``/``nan``; ``-inf`` and ``nan`` logits count as masked and stay masked;
every row keeps at least its top token (a row with no finite logit keeps its
first token).

Live values (:meth:`SamplingParams.from_values`, :class:`LiveSampling`):

* ``None`` means the knob's "off" value where one exists: ``top_p`` -> 1.0,
  ``top_k`` -> 0, ``min_p`` -> 0.0, ``repetition_penalty`` -> 1.0.
  ``temperature`` and ``max_new_tokens`` have no "off" value: ``None`` there is
  refused like any other invalid value.
* An invalid value refuses the whole update: :class:`LiveSampling` raises inside
  ``live.apply``, the error is logged and reported in the ``applied`` ack's
  ``errors``, and the previous params stay in force (all or nothing: a
  served set is always one the schema and this module both accept).
* A key missing from the live values (removed from the schema, or never there)
  keeps the value in force (at start: the field's default) and logs a warning
  naming the key and the value used.

Servers: read one :class:`SamplingParams` object per request (``LiveSampling.params``
or ``SamplingParams.from_values(live.values)``, each read once), never
``live["sampling.temperature"]`` then ``live["sampling.top_p"]``: an apply from
another thread between the two reads mixes two versions. Call ``live.apply``
from one control loop (or per request/token: a concurrent ``apply`` from another
thread returns ``False`` and the change lands at the next call). A pre-fork server
connects in each worker, after the fork: a connection made before it stays the parent's,
and a worker's ``LiveSampling`` on it says so in the log at its first read.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import InvalidValue
from .received import get_dotted

if TYPE_CHECKING:
    from .client import LiveConfig

__all__ = ["LiveSampling", "SamplingParams", "filter_logits", "sample"]

log = logging.getLogger(__name__)

_F32_MAX = float(torch.finfo(torch.float32).max)
# The value ``None`` stands for, per knob that has an "off" value.
_OFF: dict[str, float | int] = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
# The missing keys :class:`LiveSampling` has warned of, for the whole process: a schema
# without ``min_p`` would otherwise log a warning per key at every change, and at every
# request of a server that makes a ``LiveSampling`` per request.
_MISSING_SAID: set[str] = set()


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
            # ``numbers.Real`` takes numpy's scalars too (``np.int64`` from ``np.arange``,
            # ``np.float32``): each is converted to a plain ``int`` or ``float`` below.
            number = isinstance(v, numbers.Real) and not isinstance(v, bool)
            if not number:
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
    def from_values(
        cls,
        values: Mapping[str, Any],
        section: str = "sampling",
        *,
        base: SamplingParams | None = None,
        warn_missing: bool = False,
        said: set[str] | None = None,
    ) -> SamplingParams:
        """Build from nested (``{"sampling": {...}}``) or flat (``{"sampling.top_p": ...}``)
        values; unknown keys are ignored. A flat key wins over the same key nested.

        ``None`` means the knob's "off" value where it has one (``top_p`` 1.0, ``top_k`` 0,
        ``min_p`` 0.0, ``repetition_penalty`` 1.0); elsewhere it is refused. A missing key
        takes its value from ``base`` (default: the field defaults); with ``warn_missing``
        each one logs a warning naming the key and the value used; given ``said`` (a set of
        dotted keys, updated here), only a key not in it, and a key found again leaves it, so
        that a key stays told of once while it is missing, however many builds share the set.
        Raises :class:`InvalidValue` for a value out of range."""
        known = [f.name for f in fields(cls)]
        found: dict[str, Any] = {}
        nested = values.get(section)
        if not isinstance(nested, Mapping) and "." in section:  # a section inside another
            nested = get_dotted(values, section, None)
        if isinstance(nested, Mapping):
            found.update({k: v for k, v in nested.items() if k in known})
        prefix = section + "."
        for key, v in values.items():
            if isinstance(key, str) and key.startswith(prefix) and key[len(prefix) :] in known:
                found[key[len(prefix) :]] = v
        for name, v in list(found.items()):
            if v is None and name in _OFF:
                found[name] = _OFF[name]
        start = base if base is not None else cls()
        for name in known:
            if name in found:
                if said is not None:
                    said.discard(f"{section}.{name}")  # a later removal is told again
                continue
            found[name] = getattr(start, name)
            if warn_missing and (said is None or f"{section}.{name}" not in said):
                if said is not None:
                    said.add(f"{section}.{name}")
                log.warning(
                    "sampling_key_missing key=%s.%s using=%r (%s)",
                    section,
                    name,
                    found[name],
                    "the value in force" if base is not None else "the default",
                )
        try:
            return cls(**found)
        except InvalidValue as exc:
            if section == "sampling":
                raise
            # The checks name the default section's keys; name the keys the values came
            # from, else an operator looks for ``sampling.top_p`` in a schema that has none.
            raise InvalidValue(f"{section}.{str(exc).removeprefix('sampling.')}") from None


class LiveSampling:
    """The :class:`SamplingParams` in force for a :class:`LiveConfig`, rebuilt in
    ``live.apply`` whenever a ``section`` value changes.

    ``params`` is one immutable object, replaced whole: read it once per request (or
    token) for a consistent set, from any thread. An update that
    :meth:`SamplingParams.from_values` refuses raises inside ``live.apply``: it is logged
    and reported in the ``applied`` ack's errors, and the previous params stay in force.
    Construction raises :class:`InvalidValue` if the current values are refused.
    It may run on any thread, an apply running on another meanwhile included (a request
    thread of a server where others call ``live.apply``): a change applied between the
    read of the values and the registration is caught up with here, not missed.
    Call :meth:`close` (or use it as a context manager) to unregister.

    In a process forked from the one that connected (a worker of a pre-fork server that
    connected before forking) no change comes any more: the first read of ``params`` there
    logs ``live_sampling_forked`` (once per process). Connect in each worker after the fork.
    """

    def __init__(self, live: LiveConfig, section: str = "sampling") -> None:
        self._section = section
        # True where no change can come any more: a process forked from the one that
        # connected (a worker of a pre-fork server that connected before forking). Told
        # at the first read of ``params``: nothing may be logged in the at-fork hook.
        self._forked = live.forked
        values = live.values
        self._params = SamplingParams.from_values(
            values, section, warn_missing=True, said=_MISSING_SAID
        )
        self._handle = live.on_change(section, self._rebuild)
        # An apply on another thread may have swapped the values after the read above and
        # run its callbacks before this one was registered: its change would never reach
        # ``params``. ``live.values`` is replaced before the callbacks run, so once it is
        # still the object the params were built from (checked after each build), every
        # later change runs ``_rebuild``.
        try:
            while live.values is not values:
                values = live.values
                self._params = SamplingParams.from_values(
                    values, section, base=self._params, warn_missing=True, said=_MISSING_SAID
                )
        except InvalidValue:
            self._handle.remove()
            raise
        _live_samplings.add(self)

    @property
    def params(self) -> SamplingParams:
        """The params in force: one immutable object, replaced whole by an apply."""
        if self._forked:
            self._say_forked()
        return self._params

    def _say_forked(self) -> None:
        global _forked_said
        self._forked = False
        if _forked_said:  # once per process: a worker may make one per request
            return
        _forked_said = True
        log.warning(
            "live_sampling_forked pid=%d section=%s: this process was forked from the one "
            "that connected (a worker of a pre-fork server): its sampling settings stay "
            "as they were at the fork and no change reaches it, nor does hotknob status "
            "show it; connect in each worker after the fork (LiveConfig.connect(), then "
            "LiveSampling)",
            os.getpid(),
            self._section,
        )

    def _rebuild(self, values: Any) -> None:
        new = values if isinstance(values, Mapping) else {}
        self._params = SamplingParams.from_values(
            {self._section: new},
            self._section,
            base=self._params,
            warn_missing=True,
            said=_MISSING_SAID,
        )

    def close(self) -> None:
        self._handle.remove()
        _live_samplings.discard(self)

    def __enter__(self) -> LiveSampling:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_live_samplings: weakref.WeakSet[LiveSampling] = weakref.WeakSet()
"""Every ``LiveSampling`` made in this process, for the at-fork hook."""
_forked_said = False


def _after_fork_in_child() -> None:
    global _forked_said
    _forked_said = False
    for sampling in list(_live_samplings):
        sampling._forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
    # float64 and a clamp: a tiny or huge penalty saturates at float32's range instead of
    # overflowing to inf (and, after the temperature shift, nan).
    wide = logits.double()
    penalized = torch.where(wide > 0, wide / penalty, wide * penalty)
    penalized = penalized.clamp(-_F32_MAX, _F32_MAX).float()
    return torch.where(seen & (logits > -math.inf), penalized, logits)


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
    raw = logits.float()
    # nan and -inf are masked and stay masked; +inf and float64 values beyond float32's
    # range saturate at its largest finite value (masked is read before the float32
    # conversion, which makes -1e300 -inf).
    masked = ~(logits > -math.inf)
    out = raw.nan_to_num(nan=-math.inf, posinf=_F32_MAX).clamp(min=-_F32_MAX)
    out = out.masked_fill(masked, -math.inf)
    vocab = out.shape[1]
    if prev_tokens is not None and params.repetition_penalty != 1.0:
        out = _penalize(out, prev_tokens, params.repetition_penalty)
    if params.temperature == 0:
        top = out.argmax(dim=1, keepdim=True)
        kept = _keep_only(out, torch.zeros_like(out, dtype=torch.bool).scatter_(1, top, True))
        return _keep_one(kept)  # a row with no finite logit keeps its first token
    if params.temperature != 1.0:
        # Each row's max goes to 0 first (the softmax and every filter below are unchanged
        # by the shift), so a tiny temperature sends the other tokens to -inf rather than
        # the top ones to +inf. In float64 the shift cannot overflow and the max stays
        # exactly 0 / T = 0; -inf stays -inf, so a huge temperature flattens only the
        # tokens that are not masked.
        wide = out.double()
        top = wide.amax(dim=1, keepdim=True).nan_to_num(neginf=0.0)  # an all-masked row
        out = ((wide - top) / params.temperature).float()
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
    return _keep_one(out)


def _keep_one(out: Tensor) -> Tensor:
    # Every step above keeps each row's top token; this is the backstop for a row whose
    # logits were all masked: it keeps its first token.
    # No ``if`` on a tensor: on a GPU that would wait for the device at every token.
    empty = ~(out > -math.inf).any(dim=1, keepdim=True)
    first = torch.zeros_like(out, dtype=torch.bool)
    first[:, 0] = True
    return out.masked_fill(empty & first, 0.0)


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
    probs = filtered.softmax(dim=1).nan_to_num(nan=0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
