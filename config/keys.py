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


def meta_key(app: str) -> str:
    """Written in the same transaction as every change made with hotknob (``set``, a guard's
    revert): who and when. It lies outside the config prefix, so daemons never see it;
    ``history`` reads it back by revision, since etcd itself keeps no timestamps."""
    return f"{ROOT}/{app}/meta/last-write"


def etcd_key(app: str, key: str) -> str:
    return config_prefix(app) + key.replace(".", "/")


def key_from_etcd(app: str, etcd_path: str) -> str | None:
    """The dotted key of an etcd path under ``app``'s prefix; None if it lies outside, or
    if it names no key at all (``etcd_path_fault`` says why)."""
    prefix = config_prefix(app)
    if not etcd_path.startswith(prefix):
        return None
    rest = etcd_path[len(prefix) :]
    if _path_fault(rest) is not None:
        return None
    return rest.replace("/", ".")


def etcd_path_fault(app: str, etcd_path: str) -> str | None:
    """Why an etcd path under ``app``'s prefix names no key; None if it names one or lies
    outside the prefix.

    One key has one path: ``train.lr`` is ``train/lr``, and only that. Were ``train.lr``,
    ``train/lr/`` or ``//train/lr`` read as the same key, deleting one of them would drop
    a value another still holds, and which one wins would depend on the order they were
    read in. So a path with an empty segment or a dot in a segment is no key of any
    schema, nor is one that is not valid UTF-8 (no client could be sent its name)."""
    prefix = config_prefix(app)
    if not etcd_path.startswith(prefix):
        return None
    return _path_fault(etcd_path[len(prefix) :])


def key_path_fault(key: str) -> str | None:
    """Why the dotted ``key`` has no etcd path that reads back as ``key``; None if it has
    one (``etcd_key``, which ``key_from_etcd`` then reads back as ``key``).

    Its parts become the path's segments, so none may be empty, and none may hold a
    ``/``: ``weights.c/`` would be written at ``weights/c/``, a path no reader takes for a
    key, and ``weights.a/b`` at ``weights/a/b``, read back as ``weights.a.b``. Such a key
    of a mapping is set by writing the mapping whole (``weights={"a/b": 1}``)."""
    parts = key.split(".")
    if any(not part for part in parts):
        return "an empty part (a doubled, leading or trailing '.')"
    if any("/" in part for part in parts):
        return (
            "a '/' inside a part, which etcd would take for a separator "
            "(set the mapping that holds it whole instead)"
        )
    return _path_fault(key.replace(".", "/"))


_NOT_A_KEY = "not a key of the schema"


def _path_fault(rest: str) -> str | None:
    if not rest or rest[0] == "/" or rest[-1] == "/" or "//" in rest:
        return f"{_NOT_A_KEY}: an empty path segment (a doubled, leading or trailing '/')"
    if "." in rest:
        return f"{_NOT_A_KEY}: a '.' inside a path segment (keys are paths like train/lr)"
    if not is_text(rest):
        return f"{_NOT_A_KEY}: the path is not valid UTF-8"
    return None


def shown_text(text: str) -> str:
    """``text`` as it can be printed and sent: a byte that was not UTF-8 (carried by Python
    as a lone surrogate) as ``\\xff``, any other lone surrogate as ``\\ud800``."""
    if is_text(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


LONE_SURROGATE = "not valid text (a lone surrogate)"


class NotText(ValueError):
    """Text that holds a lone surrogate, or parses into a value that does: JSON's
    ``"\\ud800"``, or a byte that was not UTF-8 which Python carried as one (environment
    variables, command-line arguments). It cannot be written as UTF-8, so no client could
    ever be sent it, nor the state that holds it."""

    def __init__(self, reason: str = LONE_SURROGATE) -> None:
        super().__init__(reason)


class DuplicateKey(NotText):
    """JSON text whose object gives one name twice (``{"a": 1, "a": 2}``): JSON keeps the
    last and drops the other without a word, where a config file that does so is
    refused. A ``NotText``: no value can be made of it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"its JSON gives the key {shown_text(name)!r} twice: keep one")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    made = dict(pairs)
    if len(made) != len(pairs):
        names = [name for name, _ in pairs]
        raise DuplicateKey(next(k for at, k in enumerate(names) if k in names[:at]))
    return made


def is_text(value: Any) -> bool:
    """Whether every string in ``value`` (the keys of its mappings too) can be written as
    UTF-8, that is, holds no lone surrogate. Without recursion: values may nest deeply."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    return False
        elif isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return True


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

    A mapping or list value is copied, never edited: ``{"tags": {"a": 1}, "tags.b": 2}``
    gives ``{"tags": {"a": 1, "b": 2}}`` and leaves the caller's ``{"a": 1}`` as it was.
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
        node[parts[-1]] = copied(value)
    return nested


def copied(value: Any) -> Any:
    """``value`` with each mapping and list in it copied: what a validator gets to keep
    (one that edits its input in place must not edit a layer's own values)."""
    if isinstance(value, Mapping):
        return {k: copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copied(v) for v in value]
    return value


def by_first_part(
    changes: Mapping[tuple[str, ...], Any],
) -> tuple[dict[str, Any], dict[str, dict[tuple[str, ...], Any]]]:
    """``changes`` (paths to values) split into the values set at this level and, per
    name, the changes below it (their paths without the name)."""
    here: dict[str, Any] = {}
    below: dict[str, dict[tuple[str, ...], Any]] = {}
    for (name, *rest), value in changes.items():
        if rest:
            below.setdefault(name, {})[tuple(rest)] = value
        else:
            here[name] = value
    return here, below


def nested_with(
    nested: Mapping[str, Any], changes: Mapping[tuple[str, ...], Any]
) -> dict[str, Any]:
    """A copy of ``nested`` with a value set at each path of ``changes``: only the mappings
    on those paths are copied (a missing one is made), the rest is shared."""
    here, below = by_first_part(changes)
    for name, inner in below.items():
        here[name] = nested_with(nested.get(name) or {}, inner)
    return {**nested, **here}


def get_dotted(nested: Mapping[str, Any], key: str) -> Any:
    node: Any = nested
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _no_constants(name: str) -> Any:
    raise ValueError(name)


_DECODER = json.JSONDecoder(  # made once: stateless, shared
    parse_constant=_no_constants, object_pairs_hook=_unique
)


def parse_text(text: str) -> Any:
    """A JSON-text value (``0.0003``, ``true``, ``"cosine"``); a bare word stays a string.

    Whitespace around the value is no part of it, a bare word's as a number's: ``cosine``
    written with a newline after it (``echo cosine | etcdctl put ...``) or after ``= ``
    (``--set "sched.name = cosine"``) is ``cosine``, as `` 0.5`` is 0.5. Quoted, it is kept
    (``" cosine "``). Text nested too deeply to decode (``[[[[...``) stays a string too:
    the schema rejects it with a clear reason. ``NaN`` and ``Infinity`` are not JSON and
    stay strings: a number field rejects them (and a float the schema lets through as NaN
    or infinity, the merge rejects).
    Raises ``NotText`` if the value holds a lone surrogate (``"\\ud800"``), which JSON
    allows and UTF-8 cannot carry, and ``DuplicateKey`` (a ``NotText``) if an object in it
    gives one name twice.
    """
    stripped = text.strip()
    try:  # ``raw_decode``: ``decode`` would run two whitespace regexes, cold, per value
        value, end = _DECODER.raw_decode(stripped)
    except DuplicateKey:
        raise
    except (ValueError, RecursionError):  # nested too deeply to decode: a string, rejected
        value, end = stripped, -1
    if end != len(stripped):
        value = stripped
    # Only an escape (``\\u``) or text that is not ASCII can give a lone surrogate: the
    # usual value skips the walk.
    if (not stripped.isascii() or "\\u" in stripped) and not is_text(value):
        raise NotText()
    return value


def to_text(value: Any) -> str:
    """The JSON text stored in etcd for ``value`` (the inverse of ``parse_text``)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


class UnaskedApp(str):
    """The app name ``default`` where neither ``--app`` nor ``HOTKNOB_APP`` named one, told
    apart from ``--app default``: ``watch`` given a socket then shows the daemon's app,
    where an app asked for refuses a daemon of another. (Here, not in the CLI's module,
    which runs as ``__main__`` under ``python -m``: a class there is another class.)"""
