"""What counts as a change between two states: the values a process runs otherwise.

``==`` takes ``1`` for ``1.0`` and ``True``, ``-0.0`` for ``0.0`` and ``[1]`` for
``[1.0]``; a process runs each otherwise (a type, a sign, a division), so the daemon's
diff (what it pushes, what ``set`` and ``rollback`` write, which restart-only keys wait)
tells them apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The flat keys whose value differs between two states, mapped to the new value.

    The type counts (``1`` to ``1.0`` or to ``true`` is a change), and so does the sign of
    a zero (``0.0`` to ``-0.0``), inside a list or mapping too (``same_value``); a key that
    is gone from ``new`` maps to ``None``.
    """
    changed = {}
    for key, value in new.items():
        was = old.get(key, _GONE)
        kind = type(value)
        if kind is not type(was) or was != value:
            changed[key] = value
        elif kind is float:  # equal, yet maybe a zero of the other sign
            if value == 0.0 and math.copysign(1.0, value) != math.copysign(1.0, was):
                changed[key] = value
        elif kind in _CONTAINERS and not same_value(was, value):
            changed[key] = value
    changed.update((key, None) for key in old if key not in new)
    return changed


_GONE: Any = object()
# The containers whose equal values may still differ: ``[1] == [1.0]``, ``[0.0] == [-0.0]``.
_CONTAINERS = frozenset({list, tuple, dict, MappingProxyType})


def same_value(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same value as a process runs it: equal, of the same
    types all through, each zero of the same sign. ``==`` takes ``-0.0`` for ``0.0`` and
    ``[1]`` for ``[1.0]`` or ``[True]``: a change from one to the other would never reach
    the processes, which keep running the old value while ``get`` shows the new one.
    Without recursion: values may nest deeply. A value of another kind (an int, a text:
    the usual restart-only value, compared on every lone etcd put) is decided at once."""
    kind = type(a)
    if kind is not type(b) or a != b:
        return False
    if kind is not float and kind not in _CONTAINERS:
        return True
    stack = [(a, b)]
    while stack:
        a, b = stack.pop()
        kind = type(a)
        if kind is not type(b) or a != b:
            return False
        if kind is float:
            if a == 0.0 and math.copysign(1.0, a) != math.copysign(1.0, b):
                return False
        elif kind is list or kind is tuple:
            stack.extend(zip(a, b, strict=True))
        elif isinstance(a, Mapping):  # equal: the same names
            stack.extend((value, b[name]) for name, value in a.items())
    return True


def edits_inside(key: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted keys inside the mapping at ``key`` whose values differ from ``old`` to
    ``new`` (``same_value``), each with its new value (None: gone), down to the values
    that are no mappings on both sides."""
    edits: dict[str, Any] = {}
    for name, value in new.items():
        inner = f"{key}.{name}"
        was = old.get(name, _GONE)
        if isinstance(was, Mapping) and isinstance(value, Mapping):
            edits.update(edits_inside(inner, was, value))
        elif was is _GONE or not same_value(was, value):
            edits[inner] = value
    edits.update((f"{key}.{name}", None) for name in old if name not in new)
    return edits
