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

The commonest change of all, one plain value put alone outside a group, has its checks
here too, written for the one value (``lone_put``); whatever they decline, the engine's
own checks decide. What a change taken leaves unbuilt within a group is ``Pending``.

It is apart from the engine because none of it is state the engine serves: every answer
here is a function of the state in force and the change, and a change the short path
declines goes down the general path, which takes it or refuses it and says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from hotknob.config import Layer, Snapshot
from hotknob.config.keys import NotText, key_from_etcd, parse_text
from hotknob.config.leafwise import (
    LeafChanges,
    LeafCheck,
    leaf_check,
    model_with,
    validate_plain_put,
)
from hotknob.config.merge import LeafInput, booleans_for_numbers, leaf_input
from hotknob.config.schema import iter_leaves
from hotknob.config.sendable import entry_bytes, non_finite, not_text

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


class ShortPath:
    """What the short path of the engine of ``schema`` and ``app`` keeps between changes,
    and its checks for a lone plain put (see the module's docstring). ``restart`` is the
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
        ``leaves_with`` to fold in: ``lone_put`` adds the value it lets through, the engine
        the values of the other changes it takes so (``Engine._take_puts``)."""
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

    def lone_put(
        self, path: str, raw: bytes | str, snapshot: Snapshot, room: int
    ) -> tuple[str, Any, LeafChanges, int] | None:
        """``Engine._take_puts`` for its commonest change, outside a group's pending state:
        one plain value (``raw`` at the etcd path ``path``: a number, a string, ``true``,
        ``null``) put at a leaf that is validated alone, on the state of ``snapshot``, with
        ``room`` bytes the state may still grow by. The same checks give the same state,
        each done for the one value, without the loops and records that serve many
        (docs/performance-history.md, thirteenth round). If it is taken: its key, its value, the
        state it makes, and how many bytes that grows by. None, with nothing done:
        ``_take_puts`` decides, by its own checks."""
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
