"""What a state must be for the socket protocol to carry it to the clients.

The merge (``merge.merge_layers``) and the engine's short path check every accepted state
against these: its values as JSON within ``MAX_STATE_BYTES``, every number finite (JSON
has no NaN or infinity), every string valid text (UTF-8 cannot carry a lone surrogate).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

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
    back from idle (docs/performance.md, thirteenth round); anything else is encoded."""
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


def oversized(
    values: Mapping[str, Any], flat: Mapping[str, Any], winners: Mapping[str, str]
) -> tuple[str, str] | None:
    """None if ``values`` fit in ``MAX_STATE_BYTES``; else the key to blame and why the state
    cannot be sent: the largest value a layer other than the defaults set (a live one can
    drop it), else the largest value."""
    size = state_bytes(values)
    if size <= MAX_STATE_BYTES:
        return None
    sizes = {key: state_bytes({"": value}) for key, value in flat.items()}
    given = [key for key in sizes if winners.get(key, "defaults") != "defaults"]
    key = max(given or sizes, key=sizes.__getitem__)
    return key, (
        f"makes the configuration {size} bytes as JSON, over the {MAX_STATE_BYTES} that "
        f"the socket protocol carries (this value: {sizes[key]} bytes)"
    )


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
