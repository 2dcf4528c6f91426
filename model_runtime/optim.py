"""Apply live ``lr`` / ``weight_decay`` / ``momentum`` values to a torch optimizer.

A live learning rate is a *base* rate: with a scheduler attached, the schedule
keeps shaping it. Torch's schedulers disagree on where the base lives (some
step ``group["lr"]`` recursively, ``LambdaLR`` recomputes from ``base_lrs``,
``OneCycleLR`` from ``group["max_lr"]``/``["initial_lr"]``/``["min_lr"]``,
``ReduceLROnPlateau`` only multiplies the current value), so a change from base
``B0`` to ``B`` (``f = B / B0``) rewrites every place the schedule reads from:

* the current ``group["lr"]`` becomes ``lr * f`` (for the cosine kinds with a
  floor ``eta_min``: ``eta_min + (lr - eta_min)*(B - eta_min)/(B0 - eta_min)``,
  which is ``lr * f`` when ``eta_min`` is 0);
* ``scheduler.base_lrs`` and ``group["initial_lr"]`` are scaled by ``f``;
* OneCycleLR's ``group["max_lr"]`` / ``["min_lr"]``, CyclicLR's ``max_lrs`` and
  ReduceLROnPlateau's ``min_lrs`` are scaled by ``f``;
* ``scheduler._last_lr`` is refreshed, so ``get_last_lr()`` reports what the
  optimizer holds right after the change.

The trajectory after the change is then the one a run started at base ``B``
would follow from the same step. ``docs/schedulers.md`` has the table.

Several param groups keep the ratios they had when the binding was made. A
tensor learning rate (capturable or compiled optimizers) is written in place
with ``fill_`` and never replaced, so graphs that captured it see the change.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterator, Mapping, MutableMapping, MutableSequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from .errors import InvalidValue

__all__ = ["OptimizerBinding"]

_FLOORED = (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts)


def _num(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _put(container: MutableMapping[str, Any] | MutableSequence[Any], key: Any, v: float) -> None:
    """Store ``v`` at ``container[key]``; a tensor there is filled in place, never replaced."""
    old = container[key]
    if isinstance(old, torch.Tensor):
        old.fill_(v)
    else:
        container[key] = v


def _walk(scheduler: Any) -> Iterator[Any]:
    """The scheduler and, for SequentialLR / ChainedScheduler, its children (depth first)."""
    if scheduler is None:
        return
    yield scheduler
    for child in getattr(scheduler, "_schedulers", ()) or ():
        yield from _walk(child)


def _scheduler_bases(scheduler: Any, optimizer: Optimizer) -> list[float] | None:
    """The per-group base rates a scheduler computes from, or None if it keeps none."""
    if scheduler is None or isinstance(scheduler, lrs.ReduceLROnPlateau):
        return None
    if isinstance(scheduler, lrs.OneCycleLR):
        return [_num(g["max_lr"]) for g in optimizer.param_groups]
    for child in getattr(scheduler, "_schedulers", ()) or ():
        bases = _scheduler_bases(child, optimizer)
        if bases is not None:
            return bases
    base_lrs = getattr(scheduler, "base_lrs", None)
    if base_lrs is not None and len(base_lrs) == len(optimizer.param_groups):
        return [_num(b) for b in base_lrs]
    return None


def _floor(scheduler: Any) -> float:
    """The absolute floor the active schedule anneals towards (cosine ``eta_min``), else 0."""
    if isinstance(scheduler, _FLOORED):
        return float(scheduler.eta_min)
    if isinstance(scheduler, lrs.SequentialLR):
        active = bisect_right(scheduler._milestones, scheduler.last_epoch)
        return _floor(scheduler._schedulers[active])
    return 0.0


def _finite(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | torch.Tensor):
        raise InvalidValue(f"{key}: expected a number, got {value!r}")
    v = _num(value)
    if not math.isfinite(v):
        raise InvalidValue(f"{key}: expected a finite number, got {v!r}")
    return v


class OptimizerBinding:
    """Binds live keys to an optimizer's param groups (and its scheduler, if any).

    ``apply(values, changed)`` acts only on bound keys present in both
    ``changed`` and ``values``; a key bound to ``None`` is never touched.
    Values are checked before anything is written, so a rejected apply leaves
    the optimizer and scheduler exactly as they were. Applying the value that
    is already in force changes nothing, bit for bit.

    Group ratios are taken at construction, relative to the base rate (the
    scheduler's base, else the group's current lr) of the first group whose base is
    not 0, the reference group; a live lr ``L`` gives group ``i`` the base
    ``L * ratio_i``. A group whose base is 0 (frozen) keeps ratio 0 and stays at 0.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        scheduler: Any = None,
        *,
        lr: str | None = "train.lr",
        weight_decay: str | None = "train.weight_decay",
        momentum: str | None = "train.momentum",
    ) -> None:
        if not optimizer.param_groups:
            raise InvalidValue("optimizer has no param groups")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.lr_key = lr
        self.weight_decay_key = weight_decay
        self.momentum_key = momentum
        bases = _scheduler_bases(scheduler, optimizer)
        self._own_bases: list[float] | None = None
        if bases is None:
            bases = self._own_bases = [_num(g["lr"]) for g in optimizer.param_groups]
        reference = next((b for b in bases if b != 0), 0.0)
        self._ratios = [b / reference if reference != 0 else 1.0 for b in bases]

    @property
    def ratios(self) -> tuple[float, ...]:
        """Each group's base rate relative to the reference group's, as fixed at bind time."""
        return tuple(self._ratios)

    @property
    def base_lr(self) -> float:
        """The reference group's base rate in force now: what a live lr value sets."""
        return self._bases()[self._reference()]

    def _reference(self) -> int:
        """The reference group: the first whose ratio is not 0."""
        return next((i for i, r in enumerate(self._ratios) if r != 0), 0)

    def apply(self, values: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        """Apply the bound keys that changed; see the class docstring for the guarantees."""

        def wanted(key: str | None) -> float | None:
            if key is None or key not in changed or key not in values:
                return None
            return _finite(key, values[key])

        lr = wanted(self.lr_key)
        wd = wanted(self.weight_decay_key)
        mom = wanted(self.momentum_key)
        if lr is not None and lr <= 0:
            raise InvalidValue(f"{self.lr_key}: learning rate must be > 0, got {lr!r}")
        if wd is not None and wd < 0:
            raise InvalidValue(f"{self.weight_decay_key}: weight decay must be >= 0, got {wd!r}")
        if mom is not None and not 0 <= mom < 1:
            raise InvalidValue(f"{self.momentum_key}: momentum must be in [0, 1), got {mom!r}")

        if lr is not None:
            self._apply_lr(lr)
        if wd is not None:
            for group in self.optimizer.param_groups:
                if "weight_decay" in group:
                    _put(group, "weight_decay", wd)
        if mom is not None:
            for group in self.optimizer.param_groups:
                self._apply_momentum(group, mom)

    def state_dict(self) -> dict[str, Any]:
        """The binding's own state: group ratios and, where no scheduler keeps one, the bases."""
        own = None if self._own_bases is None else list(self._own_bases)
        return {"ratios": list(self._ratios), "own_bases": own}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ratios (and own bases) saved by :meth:`state_dict` for the same groups."""
        n = len(self.optimizer.param_groups)
        ratios = [float(r) for r in state["ratios"]]
        own = state.get("own_bases")
        if len(ratios) != n or (own is not None and len(own) != n):
            raise InvalidValue(
                f"binding state is for {len(ratios)} param groups, optimizer has {n}"
            )
        self._ratios = ratios
        if own is not None and self._own_bases is not None:
            self._own_bases = [float(b) for b in own]

    def _bases(self) -> list[float]:
        n = len(self.optimizer.param_groups)
        bases = _scheduler_bases(self.scheduler, self.optimizer)
        if bases is None:
            bases = self._own_bases
        if bases is None or len(bases) != n or len(self._ratios) != n:
            raise InvalidValue("the optimizer's param groups changed since bind: bind it again")
        return list(bases)

    def _apply_lr(self, live: float) -> None:
        groups = self.optimizer.param_groups
        old_bases = self._bases()
        new_bases = [live * r for r in self._ratios]
        if live == old_bases[self._reference()]:
            # The value in force: a group whose base is that value times its ratio keeps
            # it bit for bit (``live * ratio`` may differ from it in the last place).
            new_bases = [
                old if math.isclose(old, new, rel_tol=1e-12, abs_tol=0.0) else new
                for old, new in zip(old_bases, new_bases, strict=True)
            ]
        schedulers = list({id(s): s for s in _walk(self.scheduler)}.values())
        one_cycle = any(isinstance(s, lrs.OneCycleLR) for s in schedulers)
        floor = _floor(self.scheduler)
        touched = False
        for i, group in enumerate(groups):
            old, new = old_bases[i], new_bases[i]
            if new == old:
                continue
            touched = True
            f = new / old if old != 0 else 0.0

            def scaled(
                x: Any, floor_kind: bool = False, f: float = f, old: float = old, new: float = new
            ) -> float:
                v = _num(x)
                if old == 0:  # from 0 nothing scales: a base becomes ``new``, a floor stays
                    return v if floor_kind else new
                return new if v == old else v * f

            if self.scheduler is None or old == 0:
                _put(group, "lr", new)
            elif old != floor:
                cur = _num(group["lr"])
                _put(group, "lr", floor + (cur - floor) * (new - floor) / (old - floor))
            else:
                _put(group, "lr", _num(group["lr"]) * f)
            for key in ("initial_lr", *(("max_lr", "min_lr") if one_cycle else ())):
                if key in group:
                    _put(group, key, scaled(group[key], key == "min_lr"))
            for s in schedulers:
                for attr in ("base_lrs", "max_lrs", "min_lrs"):
                    seq = getattr(s, attr, None)
                    if isinstance(seq, list) and len(seq) == len(groups):
                        _put(seq, i, scaled(seq[i], attr == "min_lrs"))
        if self._own_bases is not None:
            self._own_bases = new_bases
        if touched:
            for s in schedulers:
                if hasattr(s, "_last_lr"):
                    s._last_lr = [
                        g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                        for g in groups
                    ]

    @staticmethod
    def _apply_momentum(group: dict[str, Any], m: float) -> None:
        if "momentum" in group:
            _put(group, "momentum", m)
        elif "betas" in group:
            betas = group["betas"]
            if isinstance(betas[0], torch.Tensor):
                betas[0].fill_(m)
            else:
                group["betas"] = (m, *tuple(betas)[1:])
