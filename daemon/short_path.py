"""What the engine's short path keeps between changes, and its checks for the commonest one.

The usual live change puts values at leaves of the schema that no layer above etcd
sets, while no restart-only key is held back: the engine takes it without a merge of
the layers (``Engine._take_puts``), as the merged leaves with the new values, validated
as the general path validates them (``tests/test_engine_short_path.py`` holds the two
paths to each other). ``ShortPath`` keeps what makes that cheap from one change to the
next, and must stay true to the layers in force:

- the layers' merged leaves (``leaves``), merged again when the layers change, and the
  puts taken since, folded in only when the whole model is validated again;
- the leaves no layer above etcd sets (``fast_keys``): the only ones a change on the
  short path may put;
- for each etcd path met, its key and its check (``lone_put``).

The checks that decide whether a change may take the short path are here too (``puts``),
and the commonest change of all, one plain value put alone outside a group, has them
written for the one value (``lone_put``); whatever that declines, ``puts`` decides.
What a change taken leaves unbuilt within a group is ``Pending``.

It is apart from the engine because none of it is state the engine serves: every answer
here is a function of the state in force and the change, and a change the short path
declines goes down the general path, which takes it or refuses it and says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from hotknob.config import Layer, Snapshot, changed_keys
from hotknob.config.errors import Problem
from hotknob.config.keys import NotText, key_from_etcd, parse_text
from hotknob.config.leafwise import (
    LeafChanges,
    LeafCheck,
    leaf_check,
    model_with,
    validate_plain_put,
    validate_puts,
)
from hotknob.config.merge import (
    SCHEMA_FAULTS,
    LeafInput,
    booleans_for_numbers,
    leaf_input,
    validate_leaves,
)
from hotknob.config.schema import iter_leaves
from hotknob.config.sendable import entry_bytes, non_finite, not_text, state_bytes
from hotknob.config.sources import read_etcd_values

from .restart_only import RestartOnly


@dataclass
class Pending:
    """The short path's accepted changes whose etcd layer and snapshot are not built yet
    (within a group commit): the newest values (its version, revision and flat values
    are the engine's own), the newest model, less the values validated leaf by leaf
    since it (``validated``: ``model_with`` adds them when the snapshot is built), and
    every value put since the last build."""

    model: BaseModel
    values: dict[str, Any]
    validated: dict[tuple[str, ...], Any] = field(default_factory=dict)
    put: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    @property
    def built_model(self) -> BaseModel:
        return model_with(self.model, self.validated) if self.validated else self.model


@dataclass
class TakenPuts:
    """A change ``ShortPath.puts`` lets through: the values put (by key) and their etcd
    paths, the state they make (nested, by dotted key, and the keys that changed), how
    many bytes that grows by, and what it was validated with: each value alone
    (``validated``, by path), or the whole model (``whole``)."""

    put: dict[str, Any]
    origins: dict[str, str]
    values: dict[str, Any]
    flat: dict[str, Any]
    changed: dict[str, Any]
    growth: int
    validated: Mapping[tuple[str, ...], Any]
    whole: BaseModel | None


class ShortPath:
    """What the short path of the engine of ``schema`` and ``app`` keeps between changes,
    and its checks (see the module's docstring). ``restart`` is the
    engine's own: a change that would move a restart-only key's value held back takes
    the general path."""

    def __init__(
        self,
        schema: type[BaseModel],
        app: str,
        precedence: Sequence[str],
        restart_only: frozenset[str],
        restart: RestartOnly,
    ) -> None:
        self._schema = schema
        self._app = app
        self._precedence = tuple(precedence)
        self._restart = restart
        self._leaf_keys = frozenset(leaf.key for leaf in iter_leaves(schema)) - restart_only
        self.above_etcd = self._precedence[self._precedence.index("etcd") + 1 :]
        """The layers above etcd, by precedence."""
        self.leaves: LeafInput | None = None
        """The layers' merged leaves (None until ``follow``, or if a layer holds a key
        that is no leaf: then no change takes the short path)."""
        self.layers_of: tuple[Layer, ...] = ()
        """The layers ``leaves`` were merged from, or any that hold the same keys: the
        engine compares its layers with them before each change, and sets them when it
        builds layers that add only the puts already folded in (``Engine._build``)."""
        self.unfolded: dict[str, Any] = {}
        """The puts validated leaf by leaf and taken since ``leaves`` was made, by key, for
        ``leaves_with`` to fold in: ``lone_put`` adds the value it lets through, ``puts``
        the values of the other changes it lets through so."""
        self.fast_keys: frozenset[str] = frozenset()
        """The leaves no layer above etcd sets: a change on the short path puts only these."""
        # ``lone_put``: the etcd paths of ``fast_keys`` it met, with key and check.
        self._ways: dict[str, tuple[str, LeafCheck]] = {}

    def follow(self, layers: Mapping[str, Layer], of: tuple[Layer, ...]) -> None:
        """Merge the leaves of ``layers`` again (``of``: its layers, which the engine found
        to differ from ``layers_of``)."""
        self.layers_of = of
        self.leaves = leaf_input(self._schema, layers, self._precedence)
        self.unfolded = {}  # the layers hold them
        above = [layers[n].values for n in self.above_etcd if n in layers]
        self.fast_keys = self._leaf_keys.difference(*above)
        self._ways = {}

    def leaves_with(self, put: Mapping[str, Any]) -> LeafInput:
        """What the whole model is validated with for the puts ``put`` (values by key):
        ``leaves`` with the puts validated leaf by leaf since it was made (kept so), and
        with ``put``."""
        assert self.leaves is not None
        if self.unfolded:
            self.leaves = self.leaves.with_leaves(self._schema, self.unfolded)
            self.unfolded = {}
        return self.leaves.with_leaves(self._schema, put)

    def puts(
        self,
        puts: Mapping[str, bytes],
        merged: Mapping[str, Any],
        merged_flat: Mapping[str, Any],
        in_force: Mapping[str, Any],
        room: int,
    ) -> TakenPuts | None:
        """The checks of ``Engine._take_puts``: whether the values ``puts`` (raw, by etcd
        path) may take the short path, on the merged state ``merged`` (nested, and
        ``merged_flat`` by dotted key), with ``in_force`` the values clients have (by dotted
        key) and ``room`` bytes the state may still grow by. The candidate is the merged
        leaves with the new values, validated as the general path validates it: each value
        alone where the schema allows, else the whole model. If it is let through, what it
        was validated with is kept here for the next change. None, with nothing kept: the
        general path takes the change (an invalid one, one that changes nothing, or one of
        another kind), and says why."""
        put: dict[str, Any] = {}
        origins: dict[str, str] = {}
        problems: list[Problem] = []
        read_etcd_values(self._app, puts, put, origins, problems)
        if problems or not put or not self.fast_keys.issuperset(put):
            return None
        if booleans_for_numbers(self._schema, put):
            return None  # ``true`` for a number: the general path refuses it, and says why
        leaves: LeafInput | None = None
        try:  # each value alone where the schema allows, else the whole model
            alone = validate_puts(self._schema, merged, merged_flat, put)
            if alone is None:
                leaves = self.leaves_with(put)
                model, values, flat = validate_leaves(self._schema, leaves)
                changed = changed_keys(in_force, flat)
            else:
                values, flat, changed = alone.values, alone.flat, alone.changed
        except SCHEMA_FAULTS:  # invalid (``ValidationError``), a value pydantic cannot dump,
            return None  # or the schema's own code raised: the general path says why, and who
        # What is in force is finite, valid text: check what changed.
        if not changed or non_finite(changed) or not_text(changed):
            return None  # nothing to push, or what no client could be sent: the merge says why
        # The state grows by at most the changed values' JSON (measured: a short text can
        # make a long value, ``0`` a datetime); near the limit, the merge measures it all.
        growth = state_bytes(changed)
        if growth > room:
            return None
        if self._restart.held_back(flat):
            return None  # a restart-only key's value to hold back
        # No restart-only key is pending or held back: ``RestartOnly.track`` has nothing to
        # do for this change.
        if alone is None:
            self.leaves = leaves
            whole: BaseModel | None = model
            validated: Mapping[tuple[str, ...], Any] = {}
        else:
            self.unfolded.update(put)
            whole, validated = None, alone.validated
        return TakenPuts(put, origins, values, flat, changed, growth, validated, whole)

    def lone_put(
        self, path: str, raw: bytes | str, snapshot: Snapshot, room: int
    ) -> tuple[str, Any, LeafChanges, int] | None:
        """``puts`` for its commonest change, outside a group's pending state:
        one plain value (``raw`` at the etcd path ``path``: a number, a string, ``true``,
        ``null``) put at a leaf that is validated alone, on the state of ``snapshot``, with
        ``room`` bytes the state may still grow by. ``puts``'s checks give the same state,
        each done for the one value, without the loops and records that serve many
        (docs/performance-history.md, thirteenth round). If it is taken: its key, its value, the
        state it makes, and how many bytes that grows by. None, with nothing done:
        ``puts`` decides."""
        way = self._ways.get(path)
        if way is None:
            key = key_from_etcd(self._app, path)
            check = leaf_check(self._schema, key) if key in self.fast_keys else None
            if key is None or check is None:
                return None
            way = self._ways[path] = (key, check)
        key, check = way
        try:
            value = parse_text(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (UnicodeDecodeError, NotText):
            return None
        if type(value) is bool and booleans_for_numbers(self._schema, {key: value}):
            return None
        lone = validate_plain_put(check, key, value, snapshot.values, snapshot.flat)
        if lone is None or non_finite(lone.changed) or not_text(lone.changed):
            return None  # what no client could be sent: the merge says why
        growth = entry_bytes(key, lone.changed[key])
        if growth > room or self._restart.held_back(lone.flat):
            return None
        self.unfolded[key] = value
        return key, value, lone, growth
