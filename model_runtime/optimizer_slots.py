"""``bind_optimizer``'s bindings, one slot per optimizer driven: binding it again replaces.

Each ``LiveConfig.bind_optimizer`` call makes an ``optim.OptimizerBinding``. Two bindings
of one optimizer for one key would apply every change twice (which compounds under
``ReduceLROnPlateau``), so the bindings are kept by the optimizer they drive (a wrapper's
inner one, which shares its param groups), and a new one for a key already bound takes
the earlier one's place: it inherits what a live 0 hid (``OptimizerBinding.inherit``), is
checked and applied to the values in force, and is registered where the earlier one was,
so that its checkpoint state is saved there. A binding for other keys stays.

Apart from ``client.LiveConfig`` because it is the one job with state of its own (the
table) that only ``bind_optimizer`` uses, and because it needs torch: the client imports
it on the first ``bind_optimizer``, never before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .binding import Handle
from .hooks import Hooks
from .lr_schedules import optimizer_chain
from .optim import OptimizerBinding


class OptimizerSlots:
    """The optimizer bindings of one ``LiveConfig``, by the optimizer they drive."""

    def __init__(self, hooks: Hooks) -> None:
        self._hooks = hooks
        # By ``id`` of the optimizer they drive (a wrapper's inner one), so that binding it
        # again for a key replaces the binding of that key.
        self._table: dict[int, list[tuple[Handle, Any]]] = {}

    def bind(
        self,
        values: Mapping[str, Any],
        optimizer: Any,
        scheduler: Any,
        *,
        lr: str | None,
        weight_decay: str | None,
        momentum: str | None,
    ) -> Handle:
        """Bind ``optimizer`` (and ``scheduler``) to the values in force, ``values``, in
        place of its earlier bindings for the same keys; ``InvalidValue`` changes nothing."""
        binding = OptimizerBinding(
            optimizer, scheduler, lr=lr, weight_decay=weight_decay, momentum=momentum
        )
        table = self._table
        slot = id(optimizer_chain(optimizer)[-1])  # a wrapper shares the inner one's groups
        kept = [(h, b) for h, b in table.get(slot, []) if not h.removed]
        replaced = [(h, b) for h, b in kept if b.keys & binding.keys]
        for _, earlier in replaced:
            binding.inherit(earlier)
        binding.check(values)
        binding.apply(values, values)
        # In the replaced binding's place, so that its checkpoint state is saved where the
        # earlier one's was: a resumed run binds in the order the code first binds.
        handle = self._hooks.add_binding(binding, in_place_of=[b for _, b in replaced])
        for earlier_handle, _ in replaced:
            earlier_handle.remove()
        table[slot] = [(h, b) for h, b in kept if not h.removed] + [(handle, binding)]
        return handle
