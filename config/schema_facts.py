"""What a merge needs to know of a schema, worked out once per schema class.

A merge runs per live change (thousands a second in a burst); walking the schema's
fields each time was most of its cost. Schema classes do not change once defined, so
the facts (``SchemaFacts``: its leaves, which of them hold mappings or numbers, their
paths, its computed fields, its secrets) are cached by class (``schema_facts``), and so
is whether a key is one of the schema's (``is_known``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from .bools_as_numbers import numeric_keys
from .schema import (
    computed_fields,
    iter_leaves,
    mapping_keys,
    may_hold_container,
    types_at,
)
from .secrecy import secret_keys

_KNOWN_CACHE_LIMIT = 4096


def _known(key: str, leaves: frozenset[str], mappings: Mapping[str, Any]) -> bool:
    """A key is known if it is a leaf or lies below a leaf that holds a mapping (a dict-typed
    field, an optional model) and that leaf's type may hold it (``types_inside``); a key
    below any other leaf (``train.lr.x``) is not a key of the schema."""
    return key in leaves or bool(types_inside(key, mappings))


def types_inside(key: str, mappings: Mapping[str, Any]) -> list[Any]:
    """The types the value at ``key`` may have inside the leaf of ``mappings`` (leaves that
    hold a mapping, and their types) it lies below (``types_at``); none if it lies below
    no such leaf, or the leaf's type holds no such key."""
    parts = key.split(".")
    for end in range(1, len(parts)):
        annotation = mappings.get(".".join(parts[:end]), _NO_LEAF)
        if annotation is not _NO_LEAF:
            return types_at(annotation, parts[end:])
    return []


_NO_LEAF: Any = object()


@dataclass(frozen=True)
class SchemaFacts:
    """What a merge needs to know of a schema, worked out once per schema class.

    A merge runs per live change (thousands a second in a burst); walking the
    schema's fields each time was most of its cost. Schema classes do not change
    once defined, so the facts are cached by class.
    """

    leaves: frozenset[str]
    mappings: dict[str, Any]  # each leaf that holds a mapping, and its type
    ordered: tuple[tuple[str, tuple[str, ...]], ...]
    paths: dict[str, tuple[str, ...]]
    secrets: frozenset[str]
    known: dict[str, bool]
    numbers: Mapping[str, Any]  # the leaves taking numbers (or holding them), their types
    containers: bool  # whether any leaf may hold a list or a mapping
    computed: tuple[tuple[str, tuple[str, ...]], ...] = ()  # the computed fields' keys, paths

    def is_known(self, key: str) -> bool:
        known = self.known.get(key)
        if known is None:
            known = _known(key, self.leaves, self.mappings)
            if len(self.known) < _KNOWN_CACHE_LIMIT:  # junk keys must not grow it for ever
                self.known[key] = known
        return known


@lru_cache(maxsize=64)
def schema_facts(schema: type[BaseModel]) -> SchemaFacts:
    all_leaves = list(iter_leaves(schema))
    keys = [leaf.key for leaf in all_leaves]
    ordered = tuple((key, tuple(key.split("."))) for key in keys)
    mappings = mapping_keys(schema)
    return SchemaFacts(
        frozenset(keys),
        {leaf.key: leaf.field.annotation for leaf in all_leaves if leaf.key in mappings},
        ordered,
        dict(ordered),
        secret_keys(schema),
        {},
        numeric_keys(schema),
        any(may_hold_container(leaf.field.annotation) for leaf in all_leaves),
        tuple((key, tuple(key.split("."))) for key, _ in computed_fields(schema)),
    )


def is_known(schema: type[BaseModel], key: str) -> bool:
    """Whether ``key`` is a key of ``schema``, as the merge takes it: a leaf, or a key under
    a leaf that holds a mapping (``weights.head``)."""
    return schema_facts(schema).is_known(key)


def leaf_values(
    values: Mapping[str, Any], ordered: tuple[tuple[str, tuple[str, ...]], ...]
) -> dict[str, Any]:
    """Every leaf of the nested ``values`` by dotted key, in schema order (one loop: this
    runs for every candidate state)."""
    flat: dict[str, Any] = {}
    key = ""
    try:
        for key, path in ordered:
            node: Any = values
            for part in path:
                node = node[part]
            flat[key] = node
    except (KeyError, TypeError, IndexError):
        raise LeftOut(key) from None
    return flat


def computed_values(
    values: Mapping[str, Any], computed: tuple[tuple[str, tuple[str, ...]], ...]
) -> dict[str, Any]:
    """The computed fields' values in the nested ``values``, by dotted key. One that is not
    there (a serializer of the schema's left it out) is no key of the state: no client
    was sent it."""
    flat: dict[str, Any] = {}
    for key, path in computed:
        node: Any = values
        for part in path:
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            flat[key] = node
    return flat


class LeftOut(KeyError):
    """A leaf of the schema missing from a model's dump (``exclude_if`` dropped it)."""
