"""What torch's learning-rate schedulers of an optimizer keep, and how a change of base
rewrites it.

A live learning rate is a *base* rate: with a scheduler attached, the schedule
keeps shaping it. Torch's schedulers disagree on where the base lives (some
step ``group["lr"]`` recursively, ``LambdaLR`` recomputes from ``base_lrs``,
``OneCycleLR`` from ``group["max_lr"]``/``["initial_lr"]``/``["min_lr"]``,
``ReduceLROnPlateau`` only multiplies the current value), so a change from base
``B0`` to ``B`` (``f = B / B0``) rewrites every place the schedule reads from:

* the current ``group["lr"]`` becomes ``lr * f`` (for the cosine kinds with a
  floor ``eta_min``: ``eta_min + (lr - eta_min)*(B - eta_min)/(B0 - eta_min)``,
  which is ``lr * f`` when ``eta_min`` is 0; a group whose ``B0`` is ``eta_min``
  takes its place in the schedule from another group, else the closed form);
* ``scheduler.base_lrs`` and ``group["initial_lr"]`` are scaled by ``f``;
* OneCycleLR's ``group["max_lr"]`` / ``["min_lr"]``, SWALR's ``group["swa_lr"]``,
  CyclicLR's ``max_lrs`` and ReduceLROnPlateau's ``min_lrs`` are scaled by ``f``;
* ``scheduler._last_lr`` is refreshed, so ``get_last_lr()`` reports what the
  optimizer holds right after the change.

The trajectory after the change is then the one a run started at base ``B``
would follow from the same step. ``docs/schedulers.md`` has the table.

Apart from ``optim.OptimizerBinding`` because this is knowledge of torch's scheduler
classes and their private attributes (where each keeps its base, which other schedulers
drive the same optimizer), which changes with torch; the binding decides what a live
value means for each param group (ratios, refusals, weight decay, momentum) and asks
this module where a base lives and what a change of it must rewrite.
"""

from __future__ import annotations

import gc
import math
import weakref
from bisect import bisect_right
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs
from torch.optim.swa_utils import SWALR

from .errors import InvalidValue
from .group_values import num

_FLOORED = (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts)
# Per-group keys in lr units that a schedule heads for rather than starts from: from a
# base of 0 they stay as they are (a base becomes the new value).
_GROUP_TARGETS = ("min_lr", "swa_lr")
_SCHEDULER_TYPES = (lrs.LRScheduler, lrs.ReduceLROnPlateau)


def walk(scheduler: Any) -> Iterator[Any]:
    """The scheduler and, for SequentialLR / ChainedScheduler, its children (depth first)."""
    if scheduler is None:
        return
    yield scheduler
    for child in getattr(scheduler, "_schedulers", ()) or ():
        yield from walk(child)


def scheduler_bases(scheduler: Any, optimizer: Optimizer) -> list[float] | None:
    """The per-group base rates a scheduler computes from, or None if it keeps none."""
    if scheduler is None or isinstance(scheduler, lrs.ReduceLROnPlateau):
        return None
    if isinstance(scheduler, lrs.OneCycleLR):
        if not all("max_lr" in g for g in optimizer.param_groups):
            return None  # a group added after the scheduler was made
        return [num(g["max_lr"]) for g in optimizer.param_groups]
    for child in getattr(scheduler, "_schedulers", ()) or ():
        bases = scheduler_bases(child, optimizer)
        if bases is not None:
            return bases
    base_lrs = getattr(scheduler, "base_lrs", None)
    if base_lrs is not None and len(base_lrs) == len(optimizer.param_groups):
        return [num(b) for b in base_lrs]
    return None


def own_bases(scheduler: Any, optimizer: Optimizer) -> list[float]:
    """The bases a binding keeps itself where no scheduler keeps one for every group: each
    group's lr; but where a scheduler keeps ``base_lrs`` for the first groups only (groups
    added with ``add_param_group`` after it was made, which torch's recursive schedulers
    step too), those, and for each group added the base its lr stands for at the point the
    schedule has reached (its lr over the reference group's lr / base), so that the bind
    changes no lr and a live lr is still a base."""
    current = [num(g["lr"]) for g in optimizer.param_groups]
    known = next((s.base_lrs for s in walk(scheduler) if hasattr(s, "base_lrs")), None)
    if known is None or len(known) >= len(current) or isinstance(scheduler, lrs.OneCycleLR):
        return current  # OneCycleLR's base is ``max_lr``, which an added group lacks
    bases = [num(b) for b in known]
    reference = next((i for i, b in enumerate(bases) if b != 0 and current[i] != 0), None)
    cut = 1.0 if reference is None else current[reference] / bases[reference]
    return bases + [lr / cut for lr in current[len(bases) :]]


def optimizer_chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and the ones it wraps (its ``optimizer`` attribute, a few levels down),
    outermost first: a scheduler may have been given any of them, and the last one holds
    the param groups and state that all of them share."""
    chain = [optimizer]
    for _ in range(4):
        inner = getattr(chain[-1], "optimizer", None)
        if inner is None or any(inner is o for o in chain) or not hasattr(inner, "param_groups"):
            break
        chain.append(inner)
    return chain


def check_drives(scheduler: Any, optimizer: Any) -> None:
    """Refuse a scheduler (or a child of it) that drives an optimizer other than
    ``optimizer``, one it wraps or one that wraps it: in a loop with two optimizers (a
    GAN's) the two schedulers are easily swapped, and the binding would take the other
    optimizer's bases for this one's and rescale the other's schedule at every live lr, the
    bind included."""
    own = optimizer_chain(optimizer)[-1]
    for s in walk(scheduler):
        driven = getattr(s, "optimizer", None)
        if driven is not None and optimizer_chain(driven)[-1] is not own:
            raise InvalidValue(
                f"the scheduler given ({type(s).__name__}) drives another optimizer "
                f"({type(driven).__name__}), not the one bound ({type(optimizer).__name__}): "
                "pass this optimizer's own scheduler"
            )


def _schedulers_of(optimizer: Any, known: list[Any]) -> list[Any]:
    """Every torch scheduler alive that drives ``optimizer`` (or one it wraps), but those
    in ``known``: found among the objects that refer to it (``gc.get_referrers``: one
    pass over the process's tracked objects, tens of ms per million), so run only at bind
    and when a live lr is about to change, never per step. A scheduler whose ``__dict__``
    was materialised (``state_dict()`` does that) is referred to through it."""
    targets = optimizer_chain(optimizer)
    known_dicts = [vars(k) for k in known if hasattr(k, "__dict__")]
    found: dict[int, Any] = {}

    def drives(obj: Any) -> bool:
        return any(getattr(obj, "optimizer", None) is t for t in targets)

    for ref in gc.get_referrers(*targets):
        if isinstance(ref, _SCHEDULER_TYPES):
            if drives(ref) and not any(ref is k for k in known):
                found[id(ref)] = ref
        elif (
            type(ref) is dict
            and "last_epoch" in ref
            and any(ref.get("optimizer") is t for t in targets)
            and not any(ref is d for d in known_dicts)
        ):
            for owner in gc.get_referrers(ref):
                if isinstance(owner, _SCHEDULER_TYPES) and getattr(owner, "__dict__", None) is ref:
                    found[id(owner)] = owner
    return list(found.values())


def _progress(scheduler: Any) -> tuple[Any, Any]:
    """What changes when a scheduler steps."""
    return getattr(scheduler, "last_epoch", None), getattr(scheduler, "_step_count", None)


class OtherSchedulers:
    """The torch schedulers of an optimizer that a binding was not given, as they stood at
    the bind: one made or stepped later is found when a live lr would change (``idle``)."""

    def __init__(self, optimizer: Any, known: list[Any]) -> None:
        self._optimizer = optimizer
        self._seen = {
            id(s): (weakref.ref(s), _progress(s)) for s in _schedulers_of(optimizer, known)
        }

    def idle(self, key: str, known: list[Any]) -> list[Any]:
        """Refuse a change of lr while a scheduler the binding was not given has been made,
        or has stepped, since the bind: at its next step it would undo the change. Return
        the others, there at the bind and idle since: harmless, but their bases follow the
        change, so that binding one of them later (the main schedule of a hand-written
        warmup loop, made at the start) does not take a base from before it and scale the
        lr, already at the live base, a second time."""
        idle = []
        for s in _schedulers_of(self._optimizer, known):
            seen = self._seen.get(id(s))
            if seen is not None and seen[0]() is s and seen[1] == _progress(s):
                idle.append(s)  # a warmup done with, or a schedule still to come
                continue
            raise InvalidValue(
                f"{key}: the optimizer has a learning-rate scheduler the binding was not "
                f"given ({type(s).__name__}, made or stepped since the bind): pass it as "
                "scheduler= to bind_optimizer (bind the optimizer again with it), or its "
                "schedule undoes live changes; two that both step: combine them in "
                "SequentialLR or ChainedScheduler and pass that"
            )
        return idle


def _group_lr_keys(schedulers: list[Any]) -> tuple[str, ...]:
    """The keys of a param group, in lr units, that the schedulers compute from and a
    change of base scales: ``initial_lr``; OneCycleLR's ``max_lr`` / ``min_lr``; SWALR's
    ``swa_lr``, the rate it anneals to and then holds, so that left alone it would undo a
    live lr at its next step."""
    keys = ["initial_lr"]
    if any(isinstance(s, lrs.OneCycleLR) for s in schedulers):
        keys += ["max_lr", "min_lr"]
    if any(isinstance(s, SWALR) for s in schedulers):
        keys.append("swa_lr")
    return tuple(keys)


def _cosine(scheduler: Any) -> Any:
    """The active cosine schedule, whose ``eta_min`` is an absolute floor, else None."""
    if isinstance(scheduler, _FLOORED):
        return scheduler
    if isinstance(scheduler, lrs.SequentialLR):
        active = bisect_right(scheduler._milestones, scheduler.last_epoch)
        return _cosine(scheduler._schedulers[active])
    return None


def _cosine_position(scheduler: Any) -> float:
    """Where a cosine schedule stands between its base (1) and its floor (0), from its
    closed form."""
    if isinstance(scheduler, lrs.CosineAnnealingWarmRestarts):
        return (1 + math.cos(math.pi * scheduler.T_cur / scheduler.T_i)) / 2
    return (1 + math.cos(math.pi * scheduler.last_epoch / scheduler.T_max)) / 2


def _position(cosine: Any, bases: list[float], lrs_now: list[float], floor: float) -> float:
    """Where a cosine schedule stands, 1 at the base and 0 at the floor: from the first
    group whose base is not the floor, else from the schedule's closed form."""
    for base, lr in zip(bases, lrs_now, strict=True):
        if base != floor:
            return (lr - floor) / (base - floor)
    return _cosine_position(cosine)


def rebase(
    optimizer: Optimizer,
    scheduler: Any,
    schedulers: list[Any],
    old_bases: list[float],
    new_bases: list[float],
) -> list[tuple[Any, Any, float]]:
    """The writes (container, key, value) that take each param group from its base in
    ``old_bases`` to its base in ``new_bases``: its lr and every place ``schedulers`` (the
    one bound, ``scheduler``, its children and the idle others) read a base from; none for
    a group whose base stays. Nothing is written here, so that the caller can check every
    value before it writes any."""
    groups = optimizer.param_groups
    group_keys = _group_lr_keys(schedulers)
    cosine = _cosine(scheduler)
    floor = float(cosine.eta_min) if cosine is not None else 0.0
    current = [num(g["lr"]) for g in groups]
    writes: list[tuple[Any, Any, float]] = []
    for i, group in enumerate(groups):
        old, new = old_bases[i], new_bases[i]
        if new == old:
            continue
        f = new / old if old != 0 else 0.0

        def scaled(
            x: Any, floor_kind: bool = False, f: float = f, old: float = old, new: float = new
        ) -> float:
            v = num(x)
            if old == 0:  # from 0 nothing scales: a base becomes ``new``, a floor stays
                return v if floor_kind else new
            return new if v == old else v * f

        if scheduler is None or old == 0:
            writes.append((group, "lr", new))
        elif old != floor:
            lr = floor + (current[i] - floor) * (new - floor) / (old - floor)
            writes.append((group, "lr", lr))
        else:
            # A base at the cosine floor stays there, so its lr tells nothing of where
            # the schedule stands; take that from the others or from the closed form.
            position = _position(cosine, old_bases, current, floor)
            writes.append((group, "lr", floor + (new - floor) * position))
        for k in group_keys:
            if k in group:
                writes.append((group, k, scaled(group[k], k in _GROUP_TARGETS)))
        for s in schedulers:
            for attr in ("base_lrs", "max_lrs", "min_lrs"):
                seq = getattr(s, attr, None)
                if isinstance(seq, list) and i < len(seq):  # shorter: groups added
                    writes.append((seq, i, scaled(seq[i], attr == "min_lrs")))
    return writes


def refresh_last_lr(schedulers: list[Any], optimizer: Optimizer) -> None:
    """Set each scheduler's ``_last_lr`` to the lrs the optimizer holds, so that
    ``get_last_lr()`` reports them right after a change."""
    for s in schedulers:
        if hasattr(s, "_last_lr"):
            s._last_lr = [
                g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                for g in optimizer.param_groups
            ]
