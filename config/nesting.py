"""Keys inside leaves across layers: how each layer's values by dotted key become one
nested input, with precedence kept for keys inside a leaf's value (``weights.head``
inside ``weights``), and how such a key is read back.

A layer that gives a mapping whole replaces what lower layers gave inside it
(``drop_below``); a key inside a mapping replaces that key of a lower layer's mapping
(``nest_by_precedence``); a state by dotted key is read at a key inside a leaf by
``value_at``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .keys import KeyClash, copied


def value_at(flat: Mapping[str, Any], key: str) -> Any:
    """The value at ``key`` in a state by dotted key: a leaf's, or one inside a leaf's
    value (``weights.head``); None if there is none."""
    if key in flat:
        return flat[key]
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        node = flat.get(".".join(parts[:end]), _NO_VALUE)
        if node is not _NO_VALUE:
            for part in parts[end:]:
                if not isinstance(node, Mapping) or part not in node:
                    return None
                node = node[part]
            return node
    return None


_NO_VALUE: Any = object()


def owner(key: str, winners: Mapping[str, str]) -> str:
    """The key of ``winners`` that ``key`` is or lies under, the deepest one (a key of a
    mapping leaf, ``weights.head``, over the leaf's whole mapping); else ``key``."""
    if key in winners:
        return key
    return max((k for k in winners if key.startswith(k + ".")), key=len, default=key)


def nest_leaves(flat: Mapping[str, Any], paths: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """``unflatten`` for keys that are all leaves of the schema (no clash is possible); a
    mapping or list value is copied, as there."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = paths[key]
        node = nested
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = copied(value) if type(value) in _CONTAINERS else value
    return nested


_CONTAINERS = frozenset({dict, list, MappingProxyType})


def drop_below(
    merged: dict[str, Any],
    winners: dict[str, str],
    given: Mapping[str, Any],
    leaves: frozenset[str],
) -> None:
    """Take out of ``merged`` (lower layers' values) the keys that lie below a key of
    ``given`` (a key of a mapping, ``weights.head``, below ``weights``): a layer that gives
    a value whole replaces what lower layers gave inside it."""
    for key in [k for k in merged if k not in leaves]:
        parts = key.split(".")
        if any(".".join(parts[:end]) in given for end in range(1, len(parts))):
            del merged[key]
            del winners[key]


def nest_by_precedence(
    flat: Mapping[str, Any], winners: Mapping[str, str], rank: Mapping[str, int]
) -> dict[str, Any]:
    """``flat`` (keys of any depth, what is left of each layer's after ``_drop_below``)
    nested: a shallower key first, so that a key of a mapping (``weights.head``) lands in
    the mapping given whole (``weights``) and replaces what is there, mapping or not. Below
    a lower layer's None (a section that is None by default) it starts a mapping; below
    any other value that is no mapping, it raises ``KeyClash``."""
    nested: dict[str, Any] = {}
    for key in sorted(flat, key=lambda k: k.count(".")):
        parts = key.split(".")
        node = nested
        for depth, part in enumerate(parts[:-1], start=1):
            child = node.get(part)
            if not isinstance(child, dict):
                if part in node:
                    above = owner(".".join(parts[:depth]), winners)
                    lower = rank[winners.get(above, "defaults")] < rank[winners[key]]
                    if child is not None or not lower:
                        raise KeyClash(key, above)
                child = node[part] = {}
            node = child
        node[parts[-1]] = copied(flat[key])
    return nested
