"""Merging layers by precedence into one validated, immutable ``Snapshot`` with provenance.

The whole candidate is validated at once: a value that is fine alone but
invalid beside another is caught, and every problem names its key and the
layer whose value won (or the layer that sent an unreadable one). What the schema
makes of the values, and why it refuses which key, is in ``model_check``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ValidationError

from .blame import clash, unsendable
from .bools_as_numbers import holds_bool_for_number
from .errors import InvalidChange, Problem, UsageError
from .keys import KeyClash, copied, nested_with
from .model_check import (
    dropped_inside,
    dumped,
    not_a_key,
    not_held,
    problems_besides,
    raised_problems,
    refused_problems,
    validated,
)
from .nesting import drop_below, nest_by_precedence, nest_leaves, owner
from .raised import SCHEMA_FAULTS, raised_in_schema
from .schema import by_field_names, restart_only_keys
from .schema_facts import LeftOut, SchemaFacts, schema_facts, types_inside
from .sendable import (
    NOT_FINITE,
    holds_any,
    holds_sets,
    listed_bytes,
    non_finite,
    not_text_problems,
    oversized,
    sort_sets,
)
from .sources import LAYERS, Layer

DEFAULT_PRECEDENCE: tuple[str, ...] = LAYERS


def parse_precedence(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"defaults,files,etcd,env,cli"`` -> a tuple, lowest first; every layer exactly once,
    ``defaults`` first: it gives every key that has a default, so a layer below it could
    never win (a live edit there would change nothing, without a word)."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    if sorted(names) != sorted(LAYERS) or len(set(names)) != len(names):
        raise UsageError(
            f"--precedence must name each of {','.join(LAYERS)} exactly once, got {','.join(names)}"
        )
    if names[0] != "defaults":
        raise UsageError(
            f"--precedence must start with defaults (the lowest layer: every layer below it "
            f"would be shadowed for good), got {','.join(names)}"
        )
    return tuple(names)


@dataclass(frozen=True)
class Snapshot:
    """A merged, validated configuration: frozen, built aside and swapped whole.

    ``values`` is the nested JSON form sent to clients; ``flat`` the same by
    dotted key (each leaf, then each computed field: a client sees its value change as
    any other's); ``sources`` the winning layer of every key (of a leaf that holds a
    mapping, the highest layer that gave it or a key inside it; of a computed field,
    ``defaults``: the schema makes it, no layer gives it); ``layers`` what every layer
    said (flat), for ``explain``.
    """

    model: BaseModel
    values: Mapping[str, Any]
    flat: Mapping[str, Any]
    sources: Mapping[str, str]
    layers: Mapping[str, Mapping[str, Any]]
    precedence: tuple[str, ...]

    def winner(self, key: str) -> str:
        return self.sources[key]

    def shadowing(self, layer: str, key: str) -> str | None:
        """The highest layer above ``layer`` whose value wins over what ``layer`` gives at
        ``key``: one that gives ``key`` itself or a value ``key`` lies inside (``weights``
        over ``weights.head``); None if none does."""
        order = [name for name in self.precedence if name in self.layers]
        if layer not in order:
            return None
        parts = key.split(".")
        covering = {".".join(parts[:end]) for end in range(1, len(parts) + 1)}
        for name in reversed(order[order.index(layer) + 1 :]):
            if not covering.isdisjoint(self.layers[name]):
                return name
        return None

    def shadowing_part(self, layer: str, key: str) -> str | None:
        """The highest layer above ``layer`` that wins over what ``layer`` gives at ``key``
        or over a part of it: ``shadowing``, or one that gives a key inside the mapping
        ``layer`` gives (``weights.head`` over a file's ``weights`` that holds ``head``), or
        any key below a value that is no mapping (``opt.beta`` over a file's ``opt: null``).
        A key a higher layer adds beside the mapping's own (``weights.tail`` over a file's
        ``{"head": 2}``) shadows nothing of it: the file's ``head`` is still in force."""
        whole = self.shadowing(layer, key)
        if whole is not None or key not in self.layers.get(layer, {}):
            return whole
        given = self.layers[layer][key]
        order = [name for name in self.precedence if name in self.layers]
        prefix = key + "."
        for name in reversed(order[order.index(layer) + 1 :]):
            inside = [
                k[len(prefix) :].split(".") for k in self.layers[name] if k.startswith(prefix)
            ]
            if inside and (
                not isinstance(given, Mapping) or any(_holds(given, parts) for parts in inside)
            ):
                return name
        return None


def _holds(node: Any, parts: Sequence[str]) -> bool:
    """Whether the nested mapping ``node`` has a value at the path ``parts``, None or not."""
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def merge_layers(
    schema: type[BaseModel],
    layers: Iterable[Layer],
    precedence: Sequence[str] = DEFAULT_PRECEDENCE,
) -> Snapshot:
    """Merge ``layers`` (lowest precedence first per ``precedence``) and validate the result.

    Raises ``InvalidChange`` listing every problem: unknown keys, unreadable
    values, and schema violations, each with the key and its layer, and for a key of the
    files layer, the file that gave it (``Problem.origin``): with several ``--config``
    files, "from files" alone does not say which to fix.
    """
    by_name = {layer.name: layer for layer in layers}
    try:
        return _merged(schema, by_name, precedence)
    except InvalidChange as exc:
        files = by_name.get("files")
        if files is None or not files.origins:
            raise
        problems = [_with_file(p, files.origins) for p in exc.problems]
        raise InvalidChange(problems) from exc.__cause__


def _with_file(problem: Problem, origins: Mapping[str, str]) -> Problem:
    """``problem`` naming the file that gave its key, or its nearest key above (a key
    inside a mapping the file gave), if it is of the files layer; else as it is."""
    if problem.layer != "files" or problem.origin:
        return problem
    key = problem.key
    while key not in origins:
        if "." not in key:
            return problem  # a section, or the whole model: its keys may come from many files
        key = key.rsplit(".", 1)[0]
    return dataclasses.replace(problem, origin=origins[key])


def _merged(
    schema: type[BaseModel], by_name: Mapping[str, Layer], precedence: Sequence[str]
) -> Snapshot:
    order = [name for name in precedence if name in by_name]
    facts = schema_facts(schema)
    is_known = facts.is_known

    problems: list[Problem] = []
    merged: dict[str, Any] = {}
    winners: dict[str, str] = {}
    leaves = facts.leaves
    all_leaves = True
    for name in order:
        layer = by_name[name]
        problems.extend(layer.problems)
        values = layer.values
        only_leaves = leaves.issuperset(values)  # the usual case, checked at C speed
        if not (only_leaves and all_leaves):  # lower layers' keys of a mapping it replaces
            drop_below(merged, winners, values, leaves)
        if only_leaves:
            merged.update(values)
            winners.update(dict.fromkeys(values, name))
            continue
        all_leaves = False
        for key, value in values.items():
            if not is_known(key):
                why = not_a_key(key, value, leaves, by_field_names(schema, key))
                problems.append(Problem(key, name, why, value))
                continue
            merged[key] = value
            winners[key] = name
    problems.extend(
        Problem(key, winners[key], _NOT_A_NUMBER, merged[key])
        for key in booleans_for_numbers(schema, merged)
    )
    # Refused as given: a field of ``Any`` (``dict[str, Any]``) would dump it as null, and
    # the processes would get null for a YAML ``.inf`` or an etcd ``1e999``.
    problems.extend(
        Problem(key, winners[key], NOT_FINITE, merged[key]) for key in non_finite(merged)
    )
    rank = {name: place for place, name in enumerate(order)}

    def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
        if all_leaves:
            return nest_leaves(flat, facts.paths)
        return nest_by_precedence(flat, winners, rank)

    if problems:
        faulty = {p.key for p in problems}
        rest = {k: v for k, v in merged.items() if k not in faulty}
        # Who gave each of ``rest`` alone: the keys at fault are not there to blame again.
        given = {k: winners[k] for k in rest}
        raise InvalidChange([*problems, *problems_besides(schema, rest, given, facts, nest)])

    try:
        nested = nest(merged)
    except KeyClash as exc:  # a key below a mapping leaf, and that leaf set to a non-mapping
        raise InvalidChange(clash(exc, merged, winners)) from exc
    raised: BaseException | None = None
    try:
        model = validated(schema, nested)
    except ValidationError as exc:
        # Not ``from exc``: pydantic's own text of the error quotes every input in full,
        # secrets too, and a traceback of the chain would print it.
        raise InvalidChange(refused_problems(schema, exc, merged, winners, facts)) from None
    except SCHEMA_FAULTS as exc:  # the schema's own code raised, naming no key
        raised = raised_in_schema(exc)
    else:
        try:
            values, flat = _dumped(model, facts)
        except LeftOut as exc:  # a leaf the dump left out (``exclude_if``)
            key = str(exc.args[0])
            raise InvalidChange([Problem(key, winners.get(key, "defaults"), _LEFT_OUT)]) from None
        except SCHEMA_FAULTS as exc:  # a value nested too deeply to dump, or the schema raised
            raised = raised_in_schema(exc)
            problems = unsendable(merged, winners)
    if raised is not None:
        # Out of the ``except``: were the trials interrupted (Ctrl-C), the traceback would
        # carry ``raised``, and its message may quote a secret.
        raise InvalidChange(
            problems or raised_problems(schema, raised, merged, winners, by_name, facts, nest)
        ) from None
    problems = [  # keys inside a model given whole: held as if each were given alone
        dataclasses.replace(problem, layer=winners[key])
        for key in facts.mappings
        if isinstance(merged.get(key), Mapping) and winners.get(key, "defaults") != "defaults"
        for problem in dropped_inside(model, key, merged[key])
    ]
    if not all_leaves:  # keys below a leaf: each held by what the leaf's value became
        problems += [
            Problem(key, winners[key], reason, merged[key])
            for key in merged
            if key not in leaves and (reason := not_held(model, key)) is not None
        ]
    if problems:
        raise InvalidChange(problems)
    problems = [
        Problem(key, winners.get(key, "defaults"), NOT_FINITE, flat[key])
        for key in non_finite(flat)
    ]
    if problems:  # a schema that allows NaN or infinity: no client could be sent it
        raise InvalidChange(problems)
    try:
        too_large = oversized(values, flat, winners, _listed(schema))
    except UnicodeEncodeError:  # a lone surrogate, which UTF-8 cannot carry to a client
        raise InvalidChange(not_text_problems(flat, winners)) from None
    if too_large is not None:
        key, reason = too_large
        raise InvalidChange([Problem(key, winners.get(key, "defaults"), reason, flat[key])])
    sources = {key: winners.get(key, "defaults") for key in flat}
    for key, name in winners.items():
        if key not in sources:  # a key inside a leaf's mapping (``weights.head``): the leaf
            leaf = owner(key, sources)  # is from the highest layer that gave it a part
            if leaf in sources and rank[name] > rank[sources[leaf]]:
                sources[leaf] = name
    # A layer's values are already a read-only copy of its own (``Layer.__post_init__``).
    said = {name: by_name[name].values for name in order}
    return Snapshot(
        model=model,
        values=MappingProxyType(values),
        flat=MappingProxyType(flat),
        sources=MappingProxyType(sources),
        layers=MappingProxyType(said),
        precedence=tuple(precedence),
    )


@dataclass(frozen=True)
class LeafInput:
    """What ``merge_layers`` validates when every key is a leaf of the schema: each
    key's value from the highest layer that has it, nested as the model's input. Never
    edited: ``with_leaves`` makes another."""

    nested: Mapping[str, Any]

    def with_leaves(self, schema: type[BaseModel], values: Mapping[str, Any]) -> LeafInput:
        """This input with ``values`` (leaves of ``schema``) replaced: only the sections on
        their paths are copied."""
        paths = schema_facts(schema).paths
        return LeafInput(nested_with(self.nested, {paths[key]: v for key, v in values.items()}))


def leaf_input(
    schema: type[BaseModel], layers: Mapping[str, Layer], precedence: Sequence[str]
) -> LeafInput | None:
    """What ``merge_layers`` validates, from ``layers``. None if a layer holds a key that
    is not a leaf of the schema, or a problem: only ``merge_layers`` deals with those."""
    facts = schema_facts(schema)
    merged: dict[str, Any] = {}
    for name in precedence:
        layer = layers.get(name)
        if layer is None:
            continue
        if layer.problems or not facts.leaves.issuperset(layer.values):
            return None
        merged.update(layer.values)
    return LeafInput(nest_leaves(merged, facts.paths))


def validate_leaves(
    schema: type[BaseModel], leaves: LeafInput
) -> tuple[BaseModel, dict[str, Any], dict[str, Any]]:
    """Validate a ``LeafInput``: the model, its values (JSON form, secrets revealed) and
    the same by dotted key, as ``merge_layers`` makes them, except that NaN and infinity
    are let through: the caller checks what changed with ``non_finite``. Raises
    ``ValidationError``, and ``ValueError`` for NaN or infinity given to a schema with a
    field of ``Any`` (whose dump would hide it); ``merge_layers`` says which layer is to
    blame."""
    facts = schema_facts(schema)
    nested = copied(leaves.nested) if facts.containers else leaves.nested  # a validator
    model = validated(schema, nested)  # may edit its input: not the layers' own lists
    if holds_any(schema) and non_finite(leaves.nested):
        raise ValueError(NOT_FINITE)  # which a field of ``Any`` would dump as null
    return (model, *_dumped(model, facts))


@lru_cache(maxsize=64)
def _listed(schema: type[BaseModel]) -> int:
    """The bytes a snapshot names ``schema``'s restart-only and secret keys in, once more
    beside its values (``listed_bytes``): worked out once per schema."""
    return listed_bytes(restart_only_keys(schema), schema_facts(schema).secrets)


def _dumped(model: BaseModel, facts: SchemaFacts) -> tuple[dict[str, Any], dict[str, Any]]:
    """``dumped``, with each set in one order whatever the process (``sort_sets``); the
    flat values are the nested ones' own objects, so both are sorted."""
    values, flat = dumped(model, facts)
    if holds_sets(type(model)):
        sort_sets(model, values)
    return values, flat


_LEFT_OUT = (
    "is left out of the configuration's JSON by the schema (exclude_if), so no client "
    "could be sent it"
)
_NOT_A_NUMBER = "takes no true/false here: pydantic would read it as the number 1 or 0"


def booleans_for_numbers(schema: type[BaseModel], flat: Mapping[str, Any]) -> list[str]:
    """The keys of ``flat`` that hold ``true`` or ``false`` where the schema takes a number
    only, at the leaf or inside it (``[true]`` for a ``list[float]``, ``weights.head=true``
    for a ``dict[str, float]``): a typo a schema's lax validation would pass as 1.0 or 0.0
    (a learning rate of 1.0). One loop over ``flat``, a type test for most values: the
    engine's short path asks it for the values put."""
    facts = schema_facts(schema)
    found = []
    for key, value in flat.items():
        if type(value) not in _MAY_HOLD_BOOLS:
            continue
        annotation = facts.numbers.get(key)
        if annotation is not None:
            if holds_bool_for_number(annotation, value):
                found.append(key)
        elif key not in facts.leaves:  # a key inside a leaf that holds a mapping
            types = types_inside(key, facts.mappings)
            if types and all(holds_bool_for_number(t, value) for t in types):
                found.append(key)
    return found


_MAY_HOLD_BOOLS = frozenset({bool, list, dict, MappingProxyType})


FIXED_LAYERS = ("defaults", "env", "cli")
"""The layers set at a daemon's start, for good (``files_alone``)."""
_ALONE_NOTE = (
    " (checked without the layers above the files: a value they shadow takes effect where"
    " they do not set its key)"
)


def files_alone(
    schema: type[BaseModel], layers: Iterable[Layer], precedence: Sequence[str]
) -> None:
    """Raise ``InvalidChange`` unless the ``files`` layer of ``layers`` is valid over the
    fixed layers below it alone (the defaults, in the default order), as ``hotknob
    validate`` checks a file; nothing if there is no files layer.

    A file value that etcd shadows now takes effect once the key leaves etcd: unchecked,
    it would make that ``unset`` (or a daemon started on an etcd without the key) fail
    for a value nobody is editing. A file value env or ``--set`` shadows would take
    effect in any container without them. So the daemon refuses such files as any
    invalid ones, and so do the commands that read them (``get``, ``explain``, ``set``).
    """
    by_name = {layer.name: layer for layer in layers}
    files = by_name.get("files")
    if files is None:
        return
    place = list(precedence).index("files") + 1
    order = precedence[:place]
    below = [by_name[n] for n in order if n in FIXED_LAYERS and n in by_name]
    try:
        merge_layers(schema, [*below, files], order)
    except InvalidChange as exc:
        above = [by_name[n].values for n in precedence[place:] if n in by_name]
        raise InvalidChange(
            [
                dataclasses.replace(p, reason=p.reason + _ALONE_NOTE)
                if _shadowed(p.key, above)
                else p  # the note would send the reader looking for a layer that is not there
                for p in exc.problems
            ]
        ) from None


def _shadowed(key: str, above: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a layer of ``above`` sets ``key``, a key under it or the section it is in
    (any key, for a rule of the whole model: its problem has no key)."""
    if not key:
        return any(above)
    for values in above:
        for other in values:
            if other == key or other.startswith(key + ".") or key.startswith(other + "."):
                return True
    return False
