"""A live momentum in an optimizer's param groups: which groups it leaves at 0, and the
per-param momentum buffers it must fit when it writes the others.

Apart from ``optim.OptimizerBinding`` because momentum follows rules of its own, with
state only it uses (the groups held at 0): every group takes the live value (``betas[0]``
for the Adam kinds) but a held one, and a value that goes above 0 touches the params'
optimizer state, found through wrappers and ``ZeroRedundancyOptimizer``, which no other
live key does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .group_values import num, put
from .lr_schedules import optimizer_chain


def _momentum_of(group: Mapping[str, Any]) -> float | None:
    """A group's momentum (``betas[0]`` for the Adam kinds), or None if it has neither."""
    if "momentum" in group:
        return num(group["momentum"])
    if "betas" in group:
        return num(group["betas"][0])
    return None


class GroupMomentum:
    """The momentum of the param groups of ``optimizer``: a group at 0 while another group
    is not, when made, is held at 0."""

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = optimizer
        momenta = [_momentum_of(g) for g in optimizer.param_groups]
        present = [m for m in momenta if m is not None]
        mixed = 0 in present and any(m != 0 for m in present)
        self._held = [mixed and m == 0 for m in momenta]

    def inherit(self, earlier: GroupMomentum, *, bound: bool) -> None:
        """If each group ``earlier`` knew is at 0 (a live 0 again), keep which of them it
        held at 0; ``bound``: ``earlier`` drove momentum. See
        ``OptimizerBinding.inherit``."""
        groups = self._optimizer.param_groups
        momenta = [_momentum_of(g) for g in groups]
        known = min(len(groups), len(earlier._held))
        present = [m for m in momenta[:known] if m is not None]
        if bound and present and not any(present):
            held = earlier._held[:known]
            # A known group not held counts as not 0: it is at 0 only for the live 0.
            stand_in = [
                None if m is None else (0.0 if h else 1.0)
                for m, h in zip(momenta[:known], held, strict=True)
            ]
            others = [m for m in stand_in + momenta[known:] if m is not None]
            mixed = 0 in others and any(m != 0 for m in others)
            self._held = held + [mixed and m == 0 for m in momenta[known:]]

    def knows_groups(self) -> bool:
        """False when groups were added since the bind while a group is held: which groups
        are held is known only for those at bind."""
        return len(self._optimizer.param_groups) == len(self._held) or not any(self._held)

    def write(self, m: float) -> None:
        """Set every group that is not held to the momentum ``m``."""
        held = self._held
        for i, group in enumerate(self._optimizer.param_groups):
            if i < len(held) and held[i]:
                continue
            if "momentum" in group:
                from_zero = num(group["momentum"]) == 0
                put(group, "momentum", m)
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
        for optimizer in optimizer_chain(self._optimizer):
            for holder in (optimizer, getattr(optimizer, "optim", None)):
                state = getattr(holder, "state", None)
                if isinstance(state, Mapping) and state and not any(state is s for s in found):
                    found.append(state)
        return found
