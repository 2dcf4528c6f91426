"""The seam between live values and the objects they drive, and removable handles.

A binding is any object with ``apply(values, changed)``. ``LiveConfig`` calls it
in the training thread at the safe point (``LiveConfig.apply``), only when at
least one value changed. A binding may also offer ``state_dict()`` and
``load_state_dict()``; ``LiveConfig`` then checkpoints its state beside the
applied values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Binding(Protocol):
    def apply(self, values: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        """Bring the bound object in line with ``values``.

        ``values`` holds every applied value by flat dotted key (``train.lr``);
        ``changed`` is the subset whose value changed in this apply. Both are
        read-only.
        """
        ...


@runtime_checkable
class StatefulBinding(Binding, Protocol):
    """A binding whose own state belongs in a checkpoint."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Handle:
    """Undoes one registration; ``remove()`` may be called any number of times.

    Also a context manager: the registration lasts for the ``with`` block.
    """

    __slots__ = ("_remove",)

    def __init__(self, remove: Callable[[], object]) -> None:
        self._remove: Callable[[], object] | None = remove

    @property
    def removed(self) -> bool:
        return self._remove is None

    def remove(self) -> None:
        remove, self._remove = self._remove, None
        if remove is not None:
            remove()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
