"""Apply live ``lr`` / ``weight_decay`` / ``momentum`` values to a torch optimizer.

A live learning rate is a *base* rate: with a scheduler attached, the schedule
keeps shaping it; ``lr_schedules`` says where each of torch's schedulers keeps
its base and what a change of it rewrites (``docs/schedulers.md`` has the table).

Several param groups keep the learning-rate and weight-decay ratios they had
when the binding was made; a group whose momentum was 0 while another's was not
stays at 0. A tensor learning rate (capturable or compiled optimizers) is
written in place with ``fill_`` and never replaced, so graphs that captured it
see the change.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from .errors import InvalidValue
from .group_values import num, put
from .lr_schedules import (
    OtherSchedulers,
    check_drives,
    own_bases,
    rebase,
    refresh_last_lr,
    scheduler_bases,
    walk,
)
from .momentum import GroupMomentum

__all__ = ["OptimizerBinding"]


def _finite(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | torch.Tensor):
        raise InvalidValue(f"{key}: expected a number, got {value!r}")
    try:
        v = num(value)
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
        check_drives(scheduler, optimizer)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.lr_key = lr
        self.weight_decay_key = weight_decay
        self.momentum_key = momentum
        bases = scheduler_bases(scheduler, optimizer)
        self._own_bases: list[float] | None = None
        if bases is None:
            bases = self._own_bases = own_bases(scheduler, optimizer)
        self._ratios = _ratios(bases)
        # The schedulers of this optimizer the binding was not given, as they stand now.
        self._others = OtherSchedulers(optimizer, self._known())
        # A group without the key is never written; 0 keeps it out of the reference choice.
        decays = [num(g["weight_decay"]) if "weight_decay" in g else 0.0 for g in groups]
        self._wd_ratios = _ratios(decays)
        # The weight decay ratio 1 stands for: the reference group's at bind, then the last
        # live value that was not 0. A group added during a live 0 is measured against it
        # (``inherit``), as it would have been had it been added before.
        self._wd_scale = next((d for d in decays if d != 0), 0.0)
        self._momentum = GroupMomentum(optimizer)

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
        return list({id(s): s for s in walk(self.scheduler)}.values())

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
        decays = [num(g["weight_decay"]) for g in groups[:known] if "weight_decay" in g]
        if earlier.weight_decay_key is not None and decays and not any(decays):
            scale = earlier._wd_scale
            self._wd_ratios[:known] = earlier._wd_ratios[:known]
            for i in range(known, len(groups)):
                added = num(groups[i].get("weight_decay", 0.0))
                self._wd_ratios[i] = added / scale if scale != 0 else 1.0
            self._wd_scale = scale
        self._momentum.inherit(earlier._momentum, bound=earlier.momentum_key is not None)
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
            current = [num(g["lr"]) for g in groups]
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
        bases = scheduler_bases(self.scheduler, self.optimizer)
        if bases is None:
            bases = self._own_bases
        if bases is None or len(bases) != n:
            raise _groups_changed(key)
        return list(bases)

    def _apply_lr(self, key: str, live: float, *, write: bool) -> None:
        """Apply a live lr; without ``write``, only refuse it where applying would (but for a
        scheduler made or stepped since the bind, which ``check`` at the bind cannot meet)."""
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
            idle = self._others.idle(key, self._known())  # before anything is written
        schedulers = self._known()
        # All made after every value is known finite.
        writes = rebase(self.optimizer, self.scheduler, schedulers + idle, old_bases, new_bases)
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
            put(container, k, v)
        if self._own_bases is not None:
            self._own_bases = new_bases
        if writes:  # a group's base changed (its lr is among the writes)
            refresh_last_lr(schedulers, self.optimizer)

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
        current = [num(g.get("weight_decay", 0.0)) for g in groups]
        reference = next((i for i in having if self._wd_ratios[i] != 0), having[0])
        in_force = current[reference] == live
        for i in having:
            new = live * self._wd_ratios[i]
            if in_force and math.isclose(current[i], new, rel_tol=1e-12, abs_tol=0.0):
                continue  # as for lr: ``live * ratio`` may differ from it in the last place
            put(groups[i], "weight_decay", new)

    def _apply_momentum(self, key: str, m: float, *, write: bool) -> None:
        if not self._momentum.knows_groups():
            raise _groups_changed(key)
        if write:
            self._momentum.write(m)
