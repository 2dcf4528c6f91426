"""What the runtime received from the daemon: whole configurations, frozen once.

A ``State`` is built on the connection's thread, off the training thread: the
values are deep-frozen (read-only mappings and tuples) and flattened to dotted
keys once, so ``apply`` only compares and swaps references.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from . import protocol

MISSING: Any = object()
ABSENT: Any = object()  # a default for ``get_dotted`` (``MISSING`` asks it to raise)
MOVED: Any = object()  # ``_shared_section``: a key appeared or went


def freeze(value: Any) -> Any:
    """A read-only deep copy: mappings become mapping proxies, lists become tuples.
    Raises ``ProtocolError`` for a float that is not finite (see ``_finite``)."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if type(value) is float:
        _finite(value)
    return value


def _finite(value: float) -> None:
    """A number too large for a float (``1e999``) decodes as infinity: the daemon never
    sends one (it refuses NaN and infinity), and no training process may get one."""
    if value - value != 0.0:  # inf - inf and nan - nan are nan
        raise protocol.ProtocolError(f"a value is not a finite number: {value!r}")


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _freeze_section(section: Mapping[str, Any], prefix: str, flat: dict[str, Any]) -> Any:
    """``freeze`` and ``flatten`` in one pass over a state's values (built for every update
    on the connection's thread): a non-empty mapping is a section, anything else a leaf."""
    frozen: dict[str, Any] = {}
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        if type(value) in _SCALARS:
            if type(value) is float:
                _finite(value)
            frozen[str(key)] = flat[dotted] = value
        elif isinstance(value, Mapping) and value:
            frozen[str(key)] = _freeze_section(value, dotted + ".", flat)
        else:
            frozen[str(key)] = flat[dotted] = freeze(value)
    return MappingProxyType(frozen)


def _shared_section(
    section: Mapping[str, Any], old: Mapping[str, Any], prefix: str, flat: dict[str, Any]
) -> Any:
    """``_freeze_section`` of ``section`` beside ``old``, the same section frozen for the
    state before: a leaf or section equal to the old one (the type counts) is the old
    object, and ``old`` itself comes back if nothing in it changed. ``flat`` starts as a
    copy of the old state's, so it keeps their entries (and its dotted key strings): the
    states a rank keeps for the agreement share all but what changed between them.
    ``MOVED`` where a key appears, goes or moves, or a leaf becomes a section or back: the
    caller builds the state anew, so that its flat keys keep their order."""
    if len(section) != len(old):
        return MOVED
    frozen: dict[str, Any] = {}
    unchanged = True
    for (key, value), was in zip(section.items(), old, strict=True):
        if key != was:
            return MOVED
        before = old[key]
        kind = type(value)
        if (
            kind is type(before)
            and kind in _SCALARS
            and (value == before if kind is not float else _same_float(value, before))
        ):
            frozen[key] = before  # NaN is never equal: it is frozen below, and refused
            continue
        if isinstance(value, Mapping) and value:
            if not (isinstance(before, Mapping) and before):
                return MOVED  # a leaf became a section
            new = _shared_section(value, before, f"{prefix}{key}.", flat)
            if new is MOVED:
                return MOVED
        elif isinstance(before, Mapping) and before:
            return MOVED  # a section became a leaf
        else:
            new = freeze(value)
            if same_leaf(new, before):
                new = before
            else:
                flat[f"{prefix}{key}"] = new
        frozen[key] = new
        unchanged = unchanged and new is before
    return old if unchanged else MappingProxyType(frozen)


def same_leaf(a: Any, b: Any) -> bool:
    """Equal frozen leaves, of the same types all through (``1`` is not ``1.0``), a
    mapping's keys in the same order (a process may build things in their order) and a
    zero's sign the same (``_same_float``)."""
    if type(a) is not type(b):
        return False
    if type(a) is tuple:
        return len(a) == len(b) and all(same_leaf(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping):
        return list(a) == list(b) and all(same_leaf(v, b[k]) for k, v in a.items())
    if type(a) is float:
        return _same_float(a, b)
    return bool(a == b)


def _same_float(a: float, b: float) -> bool:
    """Equal floats, a zero's sign too: ``-0.0 == 0.0``, yet the daemon sent the one it
    sent (the JSON of the values, and so the digest, tells them apart, as ``1 / x`` does)."""
    return a == b and (a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b))


def thaw(value: Any) -> Any:
    """A plain, mutable deep copy of a frozen value (dicts and lists)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def get_dotted(nested: Mapping[str, Any], key: str, default: Any = MISSING) -> Any:
    node: Any = nested
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is MISSING:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def prefixes(keys: Iterator[str] | list[str]) -> set[str]:
    """Every section path and key touched: ``a.b.c`` gives ``a``, ``a.b``, ``a.b.c``."""
    touched: set[str] = set()
    for key in keys:
        parts = key.split(".")
        touched.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return touched


def digest_of(values: Mapping[str, Any]) -> int:
    """A 63-bit fingerprint of ``values``: equal values give equal digests on every host."""
    import hashlib
    import json

    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=repr)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


class State:
    """One whole configuration as the daemon sent it, frozen once, off the training thread.

    ``digest`` identifies the values across processes (ranks compare it), since
    ``version`` is numbered by each daemon on its own. It is computed on first use
    (only distributed sync needs it), from a plain copy of the frozen values.
    """

    __slots__ = ("_digest", "flat", "flat_view", "held", "revision", "values", "version")

    def __init__(
        self,
        version: int,
        revision: int,
        values: Mapping[str, Any],
        flat: dict[str, Any],
    ) -> None:
        self.version = version
        self.revision = revision
        self.values = values
        self.flat = flat
        self.flat_view: Mapping[str, Any] = MappingProxyType(flat)
        self._digest: int | None = None
        self.held: tuple[str, ...] = ()
        """Restart-only keys held at the value the process started with, not the daemon's
        (``restart_only.RestartOnlyHold.hold``): its ack names them."""

    @classmethod
    def build(
        cls, version: int, revision: int, values: Mapping[str, Any], like: State | None = None
    ) -> State:
        """Frozen ``values``; beside ``like`` (the state received before), sharing with it
        every section and leaf that did not change (``_shared_section``)."""
        if like is not None:
            flat = dict(like.flat)
            frozen = _shared_section(values, like.values, "", flat)
            if frozen is not MOVED:
                return cls(version, revision, frozen, flat)
        flat = {}
        frozen = _freeze_section(values, "", flat)
        return cls(version, revision, frozen, flat)

    @property
    def digest(self) -> int:
        digest = self._digest
        if digest is None:
            digest = self._digest = digest_of(thaw(self.values))
        return digest

    def same_as(self, other: State) -> bool:
        return self.version == other.version and same_values(self.flat, other.flat)


def same_values(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two flat states hold the same values, of the same types: ``1`` is not ``1.0``
    nor ``True`` (protocol.md: a change of type counts)."""
    return a == b and all(type(v) is type(b[k]) for k, v in a.items())


NOTHING = State.build(-1, 0, {})


def with_held(state: State, running: Mapping[str, Any]) -> State:
    """``state`` with the restart-only keys of ``running`` (by dotted key: a leaf, or a
    field that holds a mapping) at those values, marked ``held``; ``state`` itself if none
    differs (the type counts: ``1`` is not ``1.0``). A key ``state`` lacks is not held."""
    held = {}
    for key, value in running.items():
        sent = state.flat.get(key, ABSENT)  # a leaf: one look-up, on every update
        if sent is ABSENT:
            sent = get_dotted(state.values, key, ABSENT)
        if sent is not ABSENT and (type(sent) is not type(value) or sent != value):
            held[key] = value
    if not held:
        return state
    values = thaw(state.values)
    for key, value in held.items():
        node = values
        *sections, leaf = key.split(".")
        for part in sections:
            node = node[part]
        node[leaf] = thaw(value)
    # Beside ``state``: a rank keeps the held states, all but the held keys shared.
    new = State.build(state.version, state.revision, values, like=state)
    new.held = tuple(sorted(held))
    return new


def state_from_message(message: Mapping[str, Any], like: State | None = None) -> State:
    protocol.require_int(message, "version")
    protocol.require_int(message, "revision")
    values = message.get("values")
    if not isinstance(values, dict):
        raise protocol.ProtocolError(f'"{message["type"]}" needs an object "values"')
    return State.build(message["version"], message["revision"], values, like)
