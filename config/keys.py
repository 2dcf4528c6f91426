"""Dotted keys: flattening nested values, etcd key paths, and JSON-text values.

A key is a dotted path into the schema (``train.lr``). In etcd the same key
lives at ``/hotknob/<app>/config/train/lr``. Values in etcd, env and ``--set``
are JSON text; a word that is not JSON is taken as a plain string, which the
schema then accepts or rejects.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

ROOT = "/hotknob"


def config_prefix(app: str) -> str:
    """The etcd prefix holding ``app``'s configuration, with a trailing slash."""
    return f"{ROOT}/{app}/config/"


def status_prefix(app: str) -> str:
    return f"{ROOT}/{app}/status/"


def etcd_key(app: str, key: str) -> str:
    return config_prefix(app) + key.replace(".", "/")


def key_from_etcd(app: str, etcd_path: str) -> str | None:
    """The dotted key of an etcd path under ``app``'s prefix, or None if it lies outside."""
    prefix = config_prefix(app)
    if not etcd_path.startswith(prefix):
        return None
    rest = etcd_path[len(prefix) :].strip("/")
    if not rest or "//" in rest:
        return None
    return rest.replace("/", ".")


def flatten(
    nested: Mapping[str, Any], prefix: str = "", *, leaves: Collection[str] = ()
) -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``.

    A key named in ``leaves`` is kept whole even when its value is a mapping
    (a dict-typed field of a schema); other mappings are descended into.
    """
    flat: dict[str, Any] = {}
    for name, value in nested.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and key not in leaves:
            flat.update(flatten(value, f"{key}.", leaves=leaves))
        else:
            flat[key] = value
    return flat


class KeyClash(ValueError):
    """Two keys of one flat mapping that cannot both be nested: ``key`` lies below
    ``other``'s value (not a mapping), or ``other`` lies below ``key``'s."""

    def __init__(self, key: str, other: str):
        self.key = key
        self.other = other
        super().__init__(f"key {key!r} conflicts with key {other!r}")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1}`` -> ``{"train": {"lr": 1}}``; a leaf and a section may not clash.

    A mapping value is copied, never edited: ``{"tags": {"a": 1}, "tags.b": 2}`` gives
    ``{"tags": {"a": 1, "b": 2}}`` and leaves the caller's ``{"a": 1}`` as it was.
    Raises ``KeyClash`` naming both keys of a clash."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for depth, part in enumerate(parts[:-1], start=1):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise KeyClash(key, ".".join(parts[:depth]))
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise KeyClash(key, next((k for k in flat if k.startswith(key + ".")), key))
        node[parts[-1]] = _copied(value)
    return nested


def _copied(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copied(v) for k, v in value.items()}
    return value


def get_dotted(nested: Mapping[str, Any], key: str) -> Any:
    node: Any = nested
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _no_constants(name: str) -> Any:
    raise ValueError(name)


_DECODER = json.JSONDecoder(parse_constant=_no_constants)  # made once: stateless, shared


def parse_text(text: str) -> Any:
    """A JSON-text value (``0.0003``, ``true``, ``"cosine"``); a bare word stays a string.

    So does text nested too deeply to decode (``[[[[...``): the schema rejects it with a
    clear reason. ``NaN`` and ``Infinity`` are not JSON and stay strings: a number field
    rejects them (and a float the schema lets through as NaN or infinity, the merge rejects).
    """
    stripped = text.strip()
    try:  # ``raw_decode``: ``decode`` would run two whitespace regexes, cold, per value
        value, end = _DECODER.raw_decode(stripped)
    except (ValueError, RecursionError):  # nested too deeply to decode: a string, rejected
        return text
    return value if end == len(stripped) else text


def to_text(value: Any) -> str:
    """The JSON text stored in etcd for ``value`` (the inverse of ``parse_text``)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))
