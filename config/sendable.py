"""What a state must be for the socket protocol to carry it to the clients.

The merge (``merge.merge_layers``) and the engine's short path check every accepted state
against these: its values as JSON within ``MAX_STATE_BYTES`` and, with its dotted keys, within
one protocol line (``oversized``), every number finite (JSON has no NaN or infinity), every
string valid text (UTF-8 cannot carry a lone surrogate).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from functools import lru_cache
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from .errors import Problem
from .keys import LONE_SURROGATE, is_text

NOT_FINITE = "must be a finite number (the socket protocol cannot carry NaN or infinity)"

MAX_STATE_BYTES = 448 * 1024
"""The most a state's values may take as JSON. A protocol line holds at most 1 MiB, and an
``update`` carries the values twice over at worst (as ``values`` and as ``changed``), a
``snapshot`` the values and their sources: this leaves both room to spare."""


def state_bytes(values: Mapping[str, Any]) -> int:
    """The size of ``values`` (sections are plain dicts) as JSON, as the protocol sends it."""
    return len(_STATE_ENCODER.encode(dict(values)).encode("utf-8"))


_STATE_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def entry_bytes(key: str, value: Any) -> int:
    """``state_bytes({key: value})``. A number, ``true``, ``false`` or ``null`` is counted
    from its text without the encoder, whose setup costs a lone change ~15 us on CPUs just
    back from idle (docs/performance-history.md, thirteenth round); anything else is encoded."""
    kind = type(value)
    if kind is int or kind is float:  # as JSON writes them; the caller checked it finite
        text = int.__repr__(value) if kind is int else float.__repr__(value)
        return len(text) + _entry_frame_bytes(key)
    if kind is bool or value is None:
        return (5 if value is False else 4) + _entry_frame_bytes(key)  # true, null: 4
    return state_bytes({key: value})


@lru_cache(maxsize=1024)
def _entry_frame_bytes(key: str) -> int:
    """What ``{"key":}`` takes around a value, as ``state_bytes`` counts it."""
    return state_bytes({key: None}) - 4


LINE_BYTES = 1024 * 1024
"""``protocol.MAX_LINE_BYTES``, the longest line of the socket protocol (``config`` does not
import the runtime's modules)."""
LINE_FRAME_BYTES = 4096
"""What a ``snapshot`` or ``update`` line holds beside the values and the dotted keys: its
type, version, revision and app, with room to spare."""


def oversized(
    values: Mapping[str, Any],
    flat: Mapping[str, Any],
    winners: Mapping[str, str],
    listed: int = 0,
) -> tuple[str, str] | None:
    """None if the state can be sent; else the key to blame and why not: the largest value
    a layer other than the defaults set (a live one can drop it), else the largest value.

    It can be sent if ``values`` fit in ``MAX_STATE_BYTES`` and its longest protocol line
    fits in ``LINE_BYTES``: a ``snapshot`` names every dotted key beside the values (with
    its layer), and an ``update`` to a client sent an older state may too (with its
    value). Many keys with long dotted names take more than the values themselves (20,000
    keys of 70 characters: 1.7 MB, for 0.2 MB of values). ``listed``: the bytes a snapshot
    names the schema's restart-only and secret keys in (``listed_bytes``)."""
    size = state_bytes(values)
    if size <= MAX_STATE_BYTES:
        # A bound first, without encoding the keys (a few microseconds more at each merge
        # otherwise): a character of a key takes at most 6 bytes as JSON (``\u0001``), and
        # its quotes, its layer or the punctuation around its value 16 more; its value
        # is in ``size``.
        frame = LINE_FRAME_BYTES + listed
        if 2 * size + sum(6 * len(key) + 16 for key in flat) + frame <= LINE_BYTES:
            return None
        keyed = keyed_bytes(flat)
        line = size + keyed + frame
        if line <= LINE_BYTES:
            return None
        why = (
            f"makes a protocol line of the configuration {line} bytes: its values take {size} "
            f"bytes as JSON and its {len(flat)} keys by dotted name {keyed} more, over the "
            f"{LINE_BYTES} that one line of the socket protocol carries"
        )
    else:
        why = (
            f"makes the configuration {size} bytes as JSON, over the {MAX_STATE_BYTES} that "
            "the socket protocol carries"
        )
    sizes = {key: state_bytes({"": value}) for key, value in flat.items()}
    given = [key for key in sizes if winners.get(key, "defaults") != "defaults"]
    key = max(given or sizes, key=sizes.__getitem__)
    return key, f"{why} (this value: {sizes[key]} bytes)"


def keyed_bytes(flat: Mapping[str, Any]) -> int:
    """The most a protocol line takes for the dotted keys beside the values: a snapshot's
    ``sources`` (each key with its layer; ``defaults`` is the longest name), or an update's
    ``changed`` that holds every key (each with its value)."""
    return max(state_bytes(dict.fromkeys(flat, "defaults")), state_bytes(flat))


def listed_bytes(restart_only: Iterable[str], secret: Iterable[str]) -> int:
    """What a snapshot's ``restart_only`` and ``secret`` lists take: each key once more."""
    # ASCII escapes: at least as long as the UTF-8 the line carries them in.
    return len(json.dumps(sorted(restart_only))) + len(json.dumps(sorted(secret)))


def room(values: Mapping[str, Any], flat: Mapping[str, Any], listed: int = 0) -> int:
    """How many bytes of JSON the values of a state that ``oversized`` passed may grow by
    with the same keys (a change taken without a whole merge) and still be sent: each byte
    adds one to the values and, at worst, one to an update's ``changed``."""
    size = state_bytes(values)
    free = LINE_BYTES - LINE_FRAME_BYTES - listed - size  # what the line leaves the keys
    # A bound of ``keyed_bytes`` first, without encoding the keys (as ``oversized``): the
    # exact count only where the line, not ``MAX_STATE_BYTES``, may be what limits.
    keyed = size + sum(6 * len(key) + 16 for key in flat)
    if (free - keyed) // 2 < MAX_STATE_BYTES - size:
        keyed = keyed_bytes(flat)
    return max(0, min(MAX_STATE_BYTES - size, (free - keyed) // 2))


def not_text_problems(flat: Mapping[str, Any], winners: Mapping[str, str]) -> list[Problem]:
    """A problem for each key whose value holds a lone surrogate. The layers refuse such
    text where they parse it; this catches one that a schema's default or validator
    made. The value is left out: no log line or event could carry it either."""
    keys = not_text(flat) or [""]  # every string of a state is in some leaf's value
    return [Problem(key, winners.get(key, "defaults"), LONE_SURROGATE) for key in keys]


_PLAIN = frozenset({float, int, bool, type(None)})


def not_text(flat: Mapping[str, Any]) -> list[str]:
    """The keys whose value is, or holds, a string with a lone surrogate (one loop that
    passes numbers by: this runs for every change the engine's short path takes)."""
    return [key for key, value in flat.items() if type(value) not in _PLAIN and not is_text(value)]


def non_finite(flat: Mapping[str, Any]) -> list[str]:
    """The keys whose value is, or holds, a float that is NaN or infinite."""
    return [
        key
        for key, value in flat.items()
        if (type(value) is float and not math.isfinite(value))
        or (type(value) in (dict, list) and not _finite(value))
    ]


def _finite(value: Any) -> bool:
    if type(value) is float:
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


# --- sets ------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def holds_sets(annotation: Any) -> bool:
    """Whether a value of ``annotation`` (a schema class, a field's type) may hold a set
    anywhere in it: worked out once per type, so that a schema without one pays nothing
    for ``sort_sets``."""
    return _holds(annotation, _SET_TYPES, set())


@lru_cache(maxsize=256)
def holds_any(annotation: Any) -> bool:
    """Whether a value of ``annotation`` may hold a value of ``Any`` (or ``object``), whose
    JSON dump turns NaN and infinity into null where a float's keeps them."""
    return _holds(annotation, _ANY_TYPES, set())


_SET_TYPES: frozenset[Any] = frozenset({set, frozenset, AbstractSet})
_ANY_TYPES: frozenset[Any] = frozenset({Any, object})


def _holds(annotation: Any, wanted: frozenset[Any], seen: set[int]) -> bool:
    if id(annotation) in seen:  # a model that refers to itself
        return False
    seen.add(id(annotation))
    try:
        if annotation in wanted or get_origin(annotation) in wanted:
            return True
    except TypeError:  # unhashable metadata of an ``Annotated``
        return False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields: list[Any] = [field.annotation for field in annotation.model_fields.values()]
        return any(_holds(inner, wanted, seen) for inner in fields)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        fields = [field.type for field in dataclasses.fields(annotation)]
        return any(_holds(inner, wanted, seen) for inner in fields if not isinstance(inner, str))
    return any(_holds(inner, wanted, seen) for inner in get_args(annotation))


def sort_sets(value: Any, dumped: Any) -> None:
    """Put each set's items in ``dumped`` (``value``'s JSON dump) in one order, in place.

    pydantic dumps a set in its iteration order, which for text depends on the process's
    hash seed: two daemons (two nodes, or one restarted) would send the same set as two
    different lists, so that the ranks of one job disagree on the values and a restart
    changes them for nothing. Only a part of ``dumped`` with ``value``'s shape is touched
    (a serializer of the schema's may have made another)."""
    if isinstance(value, BaseModel):
        if isinstance(dumped, dict):
            for name in type(value).model_fields:
                if name in dumped:
                    sort_sets(getattr(value, name, None), dumped[name])
    elif isinstance(value, AbstractSet):
        if isinstance(dumped, list) and len(dumped) == len(value):
            dumped.sort(key=_set_order)
    elif isinstance(value, Mapping):
        if isinstance(dumped, dict):
            for key, inner in value.items():
                if isinstance(key, str) and key in dumped:
                    sort_sets(inner, dumped[key])
    elif isinstance(value, list | tuple):
        if isinstance(dumped, list) and len(dumped) == len(value):
            for inner, dumped_inner in zip(value, dumped, strict=True):
                sort_sets(inner, dumped_inner)
    elif dataclasses.is_dataclass(value) and isinstance(dumped, dict):
        for field in dataclasses.fields(value):
            if field.name in dumped:
                sort_sets(getattr(value, field.name, None), dumped[field.name])


def _set_order(item: Any) -> tuple[int, Any, str]:
    """Numbers by value, then texts, then anything else by its JSON text: one total order."""
    kind = type(item)
    if kind is int or kind is float:
        return (0, item, "")
    if kind is str:
        return (1, 0, item)
    return (2, 0, _SORTED_ENCODER.encode(item))


_SORTED_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)
