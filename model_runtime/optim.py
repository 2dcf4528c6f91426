"""Apply live ``lr`` / ``weight_decay`` / ``momentum`` values to a torch optimizer.

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

Several param groups keep the learning-rate and weight-decay ratios they had
when the binding was made; a group whose momentum was 0 while another's was not
stays at 0. A tensor learning rate (capturable or compiled optimizers) is
written in place with ``fill_`` and never replaced, so graphs that captured it
see the change.
"""

from __future__ import annotations

import gc
import math
import sys
import weakref
from bisect import bisect_right
from collections.abc import Iterator, Mapping, MutableMapping, MutableSequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs
from torch.optim.swa_utils import SWALR

from .errors import InvalidValue

__all__ = ["OptimizerBinding"]

_FLOORED = (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts)
# Per-group keys in lr units that a schedule heads for rather than starts from: from a
# base of 0 they stay as they are (a base becomes the new value).
_GROUP_TARGETS = ("min_lr", "swa_lr")
_SCHEDULER_TYPES = (lrs.LRScheduler, lrs.ReduceLROnPlateau)


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
        if not all("max_lr" in g for g in optimizer.param_groups):
            return None  # a group added after the scheduler was made
        return [_num(g["max_lr"]) for g in optimizer.param_groups]
    for child in getattr(scheduler, "_schedulers", ()) or ():
        bases = _scheduler_bases(child, optimizer)
        if bases is not None:
            return bases
    base_lrs = getattr(scheduler, "base_lrs", None)
    if base_lrs is not None and len(base_lrs) == len(optimizer.param_groups):
        return [_num(b) for b in base_lrs]
    return None


def _own_bases(scheduler: Any, optimizer: Optimizer) -> list[float]:
    """The bases a binding keeps itself where no scheduler keeps one for every group: each
    group's lr; but where a scheduler keeps ``base_lrs`` for the first groups only (groups
    added with ``add_param_group`` after it was made, which torch's recursive schedulers
    step too), those, and for each group added the base its lr stands for at the point the
    schedule has reached (its lr over the reference group's lr / base), so that the bind
    changes no lr and a live lr is still a base."""
    current = [_num(g["lr"]) for g in optimizer.param_groups]
    known = next((s.base_lrs for s in _walk(scheduler) if hasattr(s, "base_lrs")), None)
    if known is None or len(known) >= len(current) or isinstance(scheduler, lrs.OneCycleLR):
        return current  # OneCycleLR's base is ``max_lr``, which an added group lacks
    bases = [_num(b) for b in known]
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


def _check_drives(scheduler: Any, optimizer: Any) -> None:
    """Refuse a scheduler (or a child of it) that drives an optimizer other than
    ``optimizer``, one it wraps or one that wraps it: in a loop with two optimizers (a
    GAN's) the two schedulers are easily swapped, and the binding would take the other
    optimizer's bases for this one's and rescale the other's schedule at every live lr, the
    bind included."""
    own = optimizer_chain(optimizer)[-1]
    for s in _walk(scheduler):
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


def _finite(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | torch.Tensor):
        raise InvalidValue(f"{key}: expected a number, got {value!r}")
    try:
        v = _num(value)
    except OverflowError:
        raise InvalidValue(
            f"{key}: expected a finite number, got an integer too large for a float"
        ) from None
    if not math.isfinite(v):
        raise InvalidValue(f"{key}: expected a finite number, got {v!r}")
    return v


def _check_lr(key: str, v: float) -> None:
    if v <= 0:
        raise InvalidValue(f"{key}: learning rate must be > 0, got {v!r}")


def _check_weight_decay(key: str, v: float) -> None:
    if v < 0:
        raise InvalidValue(f"{key}: weight decay must be >= 0, got {v!r}")


def _check_momentum(key: str, v: float) -> None:
    if not 0 <= v < 1:
        raise InvalidValue(f"{key}: momentum must be in [0, 1), got {v!r}")


def _momentum_of(group: Mapping[str, Any]) -> float | None:
    """A group's momentum (``betas[0]`` for the Adam kinds), or None if it has neither."""
    if "momentum" in group:
        return _num(group["momentum"])
    if "betas" in group:
        return _num(group["betas"][0])
    return None


def _ratios(values: list[float]) -> list[float]:
    """Each value relative to the first that is not 0; all 1 when every value is 0."""
    reference = next((v for v in values if v != 0), 0.0)
    return [v / reference if reference != 0 else 1.0 for v in values]


def _overflow(key: str, value: float) -> InvalidValue:
    return InvalidValue(
        f"{key}: {value!r} is too large: a value derived from it for a param group (by the "
        "group's ratio or the schedule) is not a finite float"
    )


def _underflow(key: str, value: float) -> InvalidValue:
    return InvalidValue(
        f"{key}: {value!r} is too small: the base it gives a param group (by the group's "
        "ratio) is not a normal float"
    )


def _groups_changed(key: str) -> InvalidValue:
    return InvalidValue(f"{key}: the optimizer's param groups changed since bind: bind it again")


class OptimizerBinding:
    """Binds live keys to an optimizer's param groups (and its scheduler, if any).

    ``apply(values, changed)`` acts only on bound keys present in both
    ``changed`` and ``values``; a key bound to ``None`` is never touched. The
    keys are independent: each is checked before anything of it is written, so
    a rejected key leaves its settings exactly as they were, and the other keys
    of the same apply are still applied; ``InvalidValue``, raised after them,
    names every rejected key. Applying the value that is already in force
    changes nothing, bit for bit.

    Per-group rules are fixed at construction (bind again to change them):

    * lr: ratios relative to the base rate (the scheduler's base, else the
      group's current lr) of the first group whose base is not 0, the reference
      group; a live lr ``L`` gives group ``i`` the base ``L * ratio_i``. A group
      whose base is 0 (frozen) keeps ratio 0 and stays at 0.
    * weight_decay: the same rule on each group's ``weight_decay``; a live ``W``
      gives group ``i`` ``W * ratio_i``, so a no-decay group (0) stays at 0.
      If every group is at 0, every group takes ``W``.
    * momentum (``betas[0]`` for the Adam kinds): every group takes the live
      value, except that a group at 0 while another group is not stays at 0. A
      group that goes from 0 to more than 0 starts its params' momentum afresh.

    After ``optimizer.add_param_group`` lr and weight_decay are refused until the
    optimizer is bound again (the new group has no ratio); so is momentum if a
    group is held at 0. A binding made again takes over what the groups no longer
    show from the one it replaces (``inherit``). With no scheduler given, lr is
    refused while a param group has ``initial_lr``: torch's schedulers add it, and
    a schedule the binding does not know about would undo each live change at its
    next step.
    For the same reason a change of lr is refused while a torch scheduler of the
    optimizer that the binding was not given has been made, or has stepped, since
    the binding was (a main schedule made after a warmup in a hand-written loop):
    bind again with it.
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
        groups = optimizer.param_groups
        if not groups:
            raise InvalidValue("optimizer has no param groups")
        _check_drives(scheduler, optimizer)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.lr_key = lr
        self.weight_decay_key = weight_decay
        self.momentum_key = momentum
        bases = _scheduler_bases(scheduler, optimizer)
        self._own_bases: list[float] | None = None
        if bases is None:
            bases = self._own_bases = _own_bases(scheduler, optimizer)
        self._ratios = _ratios(bases)
        # The schedulers of this optimizer the binding was not given, as they stand now: one
        # made or stepped later is found when a live lr would change (``_check_others``).
        self._others = {
            id(s): (weakref.ref(s), _progress(s)) for s in _schedulers_of(optimizer, self._known())
        }
        # A group without the key is never written; 0 keeps it out of the reference choice.
        decays = [_num(g["weight_decay"]) if "weight_decay" in g else 0.0 for g in groups]
        self._wd_ratios = _ratios(decays)
        # The weight decay ratio 1 stands for: the reference group's at bind, then the last
        # live value that was not 0. A group added during a live 0 is measured against it
        # (``inherit``), as it would have been had it been added before.
        self._wd_scale = next((d for d in decays if d != 0), 0.0)
        momenta = [_momentum_of(g) for g in groups]
        present = [m for m in momenta if m is not None]
        mixed = 0 in present and any(m != 0 for m in present)
        self._momentum_held = [mixed and m == 0 for m in momenta]

    @property
    def keys(self) -> frozenset[str]:
        """The live keys this binding drives."""
        bound = (self.lr_key, self.weight_decay_key, self.momentum_key)
        return frozenset(k for k in bound if k is not None)

    @property
    def ratios(self) -> tuple[float, ...]:
        """Each group's base rate relative to the reference group's, as fixed at bind time."""
        return tuple(self._ratios)

    @property
    def weight_decay_ratios(self) -> tuple[float, ...]:
        """Each group's weight decay relative to the reference group's, as fixed at bind time."""
        return tuple(self._wd_ratios)

    @property
    def base_lr(self) -> float:
        """The reference group's base rate in force now: what a live lr value sets."""
        return self._bases(self.lr_key or "lr")[self._reference()]

    def _reference(self) -> int:
        """The reference group: the first whose ratio is not 0."""
        return next((i for i, r in enumerate(self._ratios) if r != 0), 0)

    def apply(self, values: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        """Apply the bound keys that changed; see the class docstring for the guarantees."""
        self._each(values, changed, write=True)

    def _each(self, values: Mapping[str, Any], keys: Mapping[str, Any], *, write: bool) -> None:
        """Check each bound key of ``keys`` that ``values`` holds and, with ``write``, apply
        it; then raise one ``InvalidValue`` naming every key refused."""
        errors: list[str] = []
        for key, check, apply_key in (
            (self.lr_key, _check_lr, self._apply_lr),
            (self.weight_decay_key, _check_weight_decay, self._apply_weight_decay),
            (self.momentum_key, _check_momentum, self._apply_momentum),
        ):
            if key is None or key not in keys or key not in values:
                continue
            try:
                v = _finite(key, values[key])
                check(key, v)
                apply_key(key, v, write=write)  # refuses with InvalidValue before it writes
            except InvalidValue as exc:
                errors.append(str(exc))
        if errors:
            raise InvalidValue("; ".join(errors))

    def _bound(self) -> dict[str, str | None]:
        return {
            "lr": self.lr_key,
            "weight_decay": self.weight_decay_key,
            "momentum": self.momentum_key,
        }

    def _group_sizes(self) -> list[int]:
        return [len(g["params"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The binding's own state: group ratios and, where no scheduler keeps one, the bases;
        and what it is for (the keys it drives, how many params each group has), which
        ``load_state_dict`` checks."""
        own = None if self._own_bases is None else list(self._own_bases)
        return {
            "ratios": list(self._ratios),
            "own_bases": own,
            "weight_decay_ratios": list(self._wd_ratios),
            "keys": self._bound(),
            "group_sizes": self._group_sizes(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved for the same keys and groups.

        ``InvalidValue``, and nothing changes, if it was saved by a binding of other keys
        or of param groups with other numbers of params (another optimizer, most likely).
        A state saved before weight-decay ratios were kept has none: the ones taken at
        bind stay; one saved before the keys and group sizes were kept is not checked
        for them.
        """
        n = len(self.optimizer.param_groups)
        keys = state.get("keys")
        if keys is not None and dict(keys) != self._bound():
            raise InvalidValue(
                f"binding state is for the keys {dict(keys)}, this binding drives {self._bound()}"
            )
        sizes = state.get("group_sizes")
        if sizes is not None and list(sizes) != self._group_sizes():
            raise InvalidValue(
                f"binding state is for param groups of {list(sizes)} params, the optimizer's "
                f"have {self._group_sizes()}"
            )
        ratios = [float(r) for r in state["ratios"]]
        own = state.get("own_bases")
        saved_wd = state.get("weight_decay_ratios")
        wd_ratios = None if saved_wd is None else [float(r) for r in saved_wd]
        if (
            len(ratios) != n
            or (own is not None and len(own) != n)
            or (wd_ratios is not None and len(wd_ratios) != n)
        ):
            raise InvalidValue(
                f"binding state is for {len(ratios)} param groups, optimizer has {n}"
            )
        self._ratios = ratios
        if own is not None:  # also where the loaded scheduler keeps fewer bases than groups
            self._own_bases = [float(b) for b in own]
        if wd_ratios is not None:
            self._wd_ratios = wd_ratios

    def _known(self) -> list[Any]:
        return list({id(s): s for s in _walk(self.scheduler)}.values())

    def _check_others(self, key: str) -> list[Any]:
        """Refuse a change of lr while a scheduler the binding was not given has been made,
        or has stepped, since the bind: at its next step it would undo the change. Return
        the others, there at the bind and idle since: harmless, but their bases follow the
        change, so that binding one of them later (the main schedule of a hand-written
        warmup loop, made at the start) does not take a base from before it and scale the
        lr, already at the live base, a second time."""
        idle = []
        for s in _schedulers_of(self.optimizer, self._known()):
            seen = self._others.get(id(s))
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

    def _check_no_unknown_scheduler(self, key: str) -> None:
        if self.scheduler is None and any("initial_lr" in g for g in self.optimizer.param_groups):
            raise InvalidValue(
                f"{key}: the optimizer has a learning-rate scheduler the binding was not given "
                "(its param groups have initial_lr): pass it as scheduler= to bind_optimizer, "
                "or its schedule undoes live changes; if none drives it any more (one used "
                "for a warmup and dropped, or state loaded from a run that had one), remove "
                "the key: for g in optimizer.param_groups: g.pop('initial_lr', None)"
            )

    def check(self, values: Mapping[str, Any]) -> None:
        """Raise ``InvalidValue`` naming every bound key of ``values`` that ``apply`` would
        refuse for its value or for a scheduler it was not given; write nothing. Run at
        bind, so that a refused bind leaves the optimizer as it was."""
        self._each(values, values, write=False)

    def inherit(self, earlier: OptimizerBinding) -> None:
        """Take over what ``earlier`` (a binding of the same optimizer, being replaced) knew
        and the param groups no longer show. The groups it knew (the first ones) decide:

        * weight decay: if each of them that has the key is at 0 (a live 0 set them
          all), they keep ``earlier``'s ratios. A group added since takes its ratio
          relative to the weight decay ratio 1 stood for before that 0 (the reference
          group's at the earlier bind, or the last live value that was not 0), as it
          would have if it had been added before the live 0; ratio 1 if there was none
          (every group at 0 since the earlier bind: each takes the live value).
        * momentum: if each of them is at 0 (a live 0 again), they keep which of them
          ``earlier`` held at 0. A group added since is held if it is at 0 while another
          group is not, a known group that ``earlier`` did not hold counting as not 0.
        * lr, when both bindings have a scheduler that keeps no bases
          (``ReduceLROnPlateau``), or none for a group added after it was made, and so
          track their own: the known groups keep
          ``earlier``'s bases, so that a bind again undoes none of the scheduler's cuts;
          a group added since gets its lr divided by the reference group's cut (its lr
          over its base), so the bind itself changes no lr; the ratios follow from
          these bases. Without a scheduler the current lr is the base (one set by
          hand holds), and nothing is carried.

        Anything else the groups show is theirs: to give a no-decay group decay, or a
        held group momentum, set it in the optimizer and bind again."""
        groups = self.optimizer.param_groups
        known = min(len(groups), len(earlier._wd_ratios))
        decays = [_num(g["weight_decay"]) for g in groups[:known] if "weight_decay" in g]
        if earlier.weight_decay_key is not None and decays and not any(decays):
            scale = earlier._wd_scale
            self._wd_ratios[:known] = earlier._wd_ratios[:known]
            for i in range(known, len(groups)):
                added = _num(groups[i].get("weight_decay", 0.0))
                self._wd_ratios[i] = added / scale if scale != 0 else 1.0
            self._wd_scale = scale
        momenta = [_momentum_of(g) for g in groups]
        known = min(len(groups), len(earlier._momentum_held))
        present = [m for m in momenta[:known] if m is not None]
        if earlier.momentum_key is not None and present and not any(present):
            held = earlier._momentum_held[:known]
            # A known group not held counts as not 0: it is at 0 only for the live 0.
            stand_in = [
                None if m is None else (0.0 if h else 1.0)
                for m, h in zip(momenta[:known], held, strict=True)
            ]
            others = [m for m in stand_in + momenta[known:] if m is not None]
            mixed = 0 in others and any(m != 0 for m in others)
            self._momentum_held = held + [mixed and m == 0 for m in momenta[known:]]
        before = earlier._own_bases
        if (
            self.scheduler is not None
            and earlier.scheduler is not None
            and self._own_bases is not None
            and before is not None
            and self.lr_key is not None
            and earlier.lr_key is not None
        ):
            known = min(len(groups), len(before))
            current = [_num(g["lr"]) for g in groups]
            reference = earlier._reference()
            cut = 1.0
            if reference < known and before[reference] != 0 and current[reference] != 0:
                cut = current[reference] / before[reference]
            bases = before[:known] + [lr / cut for lr in current[known:]]
            self._own_bases = bases
            self._ratios = _ratios(bases)

    def _bases(self, key: str) -> list[float]:
        n = len(self.optimizer.param_groups)
        if len(self._ratios) != n:
            raise _groups_changed(key)
        bases = _scheduler_bases(self.scheduler, self.optimizer)
        if bases is None:
            bases = self._own_bases
        if bases is None or len(bases) != n:
            raise _groups_changed(key)
        return list(bases)

    def _apply_lr(self, key: str, live: float, *, write: bool) -> None:
        """Apply a live lr; without ``write``, only refuse it where applying would (but for a
        scheduler made or stepped since the bind, which ``check`` at the bind cannot meet)."""
        groups = self.optimizer.param_groups
        self._check_no_unknown_scheduler(key)
        old_bases = self._bases(key)
        new_bases = [live * r for r in self._ratios]
        if live == old_bases[self._reference()]:
            # The value in force: a group whose base is that value times its ratio keeps
            # it bit for bit (``live * ratio`` may differ from it in the last place).
            new_bases = [
                old if math.isclose(old, new, rel_tol=1e-12, abs_tol=0.0) else new
                for old, new in zip(old_bases, new_bases, strict=True)
            ]
        idle: list[Any] = []
        if write and new_bases != old_bases:
            idle = self._check_others(key)  # before anything is written
        schedulers = self._known()
        group_keys = _group_lr_keys(schedulers + idle)
        cosine = _cosine(self.scheduler)
        floor = float(cosine.eta_min) if cosine is not None else 0.0
        current = [_num(g["lr"]) for g in groups]
        writes: list[tuple[Any, Any, float]] = []  # all made after every value is known finite
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
            for s in schedulers + idle:
                for attr in ("base_lrs", "max_lrs", "min_lrs"):
                    seq = getattr(s, attr, None)
                    if isinstance(seq, list) and i < len(seq):  # shorter: groups added
                        writes.append((seq, i, scaled(seq[i], attr == "min_lrs")))
        if not all(math.isfinite(v) for v in new_bases) or any(
            not math.isfinite(v) for _, _, v in writes
        ):
            raise _overflow(key, live)
        # A base below the normal floats loses its digits, or becomes 0: a recursive
        # schedule's lr then stays at 0, and a way back scales by a factor that overflows.
        if any(
            r != 0 and new != old and abs(new) < sys.float_info.min
            for r, old, new in zip(self._ratios, old_bases, new_bases, strict=True)
        ):
            raise _underflow(key, live)
        if not write:
            return
        for container, k, v in writes:
            _put(container, k, v)
        if self._own_bases is not None:
            self._own_bases = new_bases
        if touched:
            for s in schedulers:
                if hasattr(s, "_last_lr"):
                    s._last_lr = [
                        g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                        for g in groups
                    ]

    def _apply_weight_decay(self, key: str, live: float, *, write: bool) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self._wd_ratios):
            raise _groups_changed(key)
        having = [i for i, g in enumerate(groups) if "weight_decay" in g]
        if not all(math.isfinite(live * self._wd_ratios[i]) for i in having):
            raise _overflow(key, live)
        if not having or not write:
            return
        if live != 0:
            self._wd_scale = live
        current = [_num(g.get("weight_decay", 0.0)) for g in groups]
        reference = next((i for i in having if self._wd_ratios[i] != 0), having[0])
        in_force = current[reference] == live
        for i in having:
            new = live * self._wd_ratios[i]
            if in_force and math.isclose(current[i], new, rel_tol=1e-12, abs_tol=0.0):
                continue  # as for lr: ``live * ratio`` may differ from it in the last place
            _put(groups[i], "weight_decay", new)

    def _apply_momentum(self, key: str, m: float, *, write: bool) -> None:
        groups = self.optimizer.param_groups
        held = self._momentum_held
        if len(groups) != len(held) and any(held):
            raise _groups_changed(key)  # which groups are held is known only for those at bind
        if not write:
            return
        for i, group in enumerate(groups):
            if i < len(held) and held[i]:
                continue
            if "momentum" in group:
                from_zero = _num(group["momentum"]) == 0
                _put(group, "momentum", m)
                if m > 0:
                    self._momentum_buffers(group, fresh=from_zero)
            elif "betas" in group:
                betas = group["betas"]
                if isinstance(betas[0], torch.Tensor):
                    betas[0].fill_(m)
                else:
                    group["betas"] = (m, *tuple(betas)[1:])

    def _momentum_buffers(self, group: Mapping[str, Any], *, fresh: bool) -> None:
        """Fit the ``momentum_buffer`` of each param of ``group`` that has state to a
        momentum now > 0; ``fresh`` when it was 0 until now.

        Torch leaves the buffer alone while momentum is 0, so one kept from before would
        move the param by a velocity from then at the first step back: coming from 0,
        an RMSprop param's buffer is set to zeros and any other param's (SGD's) is
        dropped, which is what each optimizer has at a param's first step (SGD makes the
        buffer from the gradient then). Between two values that are not 0 a buffer is
        kept; only an RMSprop param that has none gets the zero one, as RMSprop makes it
        only if momentum is > 0 at the first step and reads it at every later step with
        momentum > 0. RMSprop's state is known by its ``square_avg`` rather than by the
        optimizer's class, so that a wrapper around one (which shares its param groups
        and state) is covered too, and so is one that keeps the state in an optimizer of
        its own (``_param_states``)."""
        states = self._param_states()
        for p in group["params"]:
            param_state = next((s[p] for s in states if s.get(p)), None)
            if not param_state:
                continue
            if "square_avg" in param_state:
                buffer = param_state.get("momentum_buffer")
                if buffer is None:
                    param_state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                elif fresh:
                    buffer.zero_()  # in place, as a captured graph may hold it
            elif fresh:
                param_state.pop("momentum_buffer", None)

    def _param_states(self) -> list[Mapping[Any, Any]]:
        """The per-param state of the optimizer, and of the one it keeps its params' state
        in where that is not shared: ``ZeroRedundancyOptimizer`` (torch.distributed) copies
        its param groups' settings into an optimizer of its own (``optim``) at each step,
        and only that one holds the state (of this rank's shard)."""
        found: list[Mapping[Any, Any]] = []
        for optimizer in optimizer_chain(self.optimizer):
            for holder in (optimizer, getattr(optimizer, "optim", None)):
                state = getattr(holder, "state", None)
                if isinstance(state, Mapping) and state and not any(state is s for s in found):
                    found.append(state)
        return found


def _position(cosine: Any, bases: list[float], lrs_now: list[float], floor: float) -> float:
    """Where a cosine schedule stands, 1 at the base and 0 at the floor: from the first
    group whose base is not the floor, else from the schedule's closed form."""
    for base, lr in zip(bases, lrs_now, strict=True):
        if base != floor:
            return (lr - floor) / (base - floor)
    return _cosine_position(cosine)
