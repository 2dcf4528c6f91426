"""What the schema makes of merged values, and why it refuses which key.

``validated`` and ``dumped`` run the schema's own validation and dump (secrets revealed
for the clients); the rest turns a refusal (a ``ValidationError``, an exception the
schema's code raised, a value pydantic would drop) into ``Problem``s that each name a key
and the layer whose value won. ``merge`` calls them; they know nothing of precedence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, RootModel, ValidationError
from pydantic_core import ErrorDetails

from .blame import is_custom, masked_input, reason_for, secret_texts
from .errors import Problem
from .keys import KeyClash
from .nesting import owner
from .raised import (
    INVALID,
    RAISED,
    SCHEMA_FAULTS,
    VALID,
    Outcome,
    as_fault,
    raised_by_schema,
    raised_in_schema,
)
from .schema_facts import SchemaFacts, computed_values, leaf_values
from .secrecy import hides, refusal_shown, revealed
from .sources import Layer

_TEXT_LAYERS = frozenset({"cli", "env", "etcd"})
_QUOTE_IT = (
    " (a value there is JSON text: a text that reads as a number, true/false or null is "
    "one, so give it in quotes, as '\"1e3\"')"
)
"""What a text field refused from a layer of JSON text (``--set k.name=1e3``) needs."""


def loc_to_key(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc)


def raised_problems(
    schema: type[BaseModel],
    exc: BaseException,
    merged: Mapping[str, Any],
    winners: Mapping[str, str],
    layers: Mapping[str, Layer],
    facts: SchemaFacts,
    nest: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> list[Problem]:
    """``raised_by_schema``'s problems for ``exc``, raised by the schema's own code while
    ``merged`` was validated or dumped: each trial nests (``nest``), validates and dumps
    the whole model."""

    def outcome(trial: dict[str, Any]) -> Outcome:
        try:
            dumped(validated(schema, nest(trial)), facts)
        except (ValidationError, KeyClash):
            return INVALID, None
        except SCHEMA_FAULTS as raised:
            return RAISED, raised_in_schema(raised)
        return VALID, None

    defaults = layers["defaults"].values if "defaults" in layers else {}
    fixed = facts.leaves.difference(defaults)
    quoted = secret_texts(schema, merged, facts.secrets) if facts.secrets else []
    return raised_by_schema(exc, merged, winners, defaults, fixed, outcome, facts.secrets, quoted)


def refused_problems(
    schema: type[BaseModel],
    exc: ValidationError,
    merged: Mapping[str, Any],
    winners: Mapping[str, str],
    facts: SchemaFacts,
) -> list[Problem]:
    """A problem for each of pydantic's errors, named by the key and the layer to blame."""
    problems: list[Problem] = []
    errors = exc.errors(include_url=False)
    # A default made from the other fields is not made once any of them failed: that
    # says nothing of its own (``default_factory_not_called``) beside their errors.
    errors = [e for e in errors if e["type"] != "default_factory_not_called"] or errors
    custom = any(is_custom(err["type"]) for err in errors)
    quoted = secret_texts(schema, merged, facts.secrets) if custom else []
    for err in errors:
        key = loc_to_key(err["loc"])
        leaf = owner(key, winners)
        if key not in facts.leaves and leaf == key and key not in facts.mappings:
            # A section's rule (a model validator; the whole model's, at ``key`` ""): the
            # keys below it that a layer gave made it fail, each from its own layer.
            prefix = f"{key}." if key else ""
            given = [k for k, by in winners.items() if k.startswith(prefix) and by != "defaults"]
            reason = _reason(err, facts, key, key, quoted)
            problems.extend(Problem(k, winners[k], reason, merged[k]) for k in given)
            if given:
                continue
        # Inside a leaf's value (a model a mapping holds, an optional model): the keys
        # given below ``key`` made it, and the leaf's own value if a layer gave it.
        below = (
            [k for k in winners if k.startswith(key + ".")]
            if leaf != key or (key in facts.mappings)
            else []
        )
        if below:
            if winners.get(leaf, "defaults") != "defaults":
                below.insert(0, leaf)
            problems.extend(
                Problem(k, winners[k], _reason(err, facts, k, k, quoted), merged[k]) for k in below
            )
            continue
        reason = _reason(err, facts, key, leaf, quoted)
        value = err["input"]
        if err["type"] == "string_type" and winners.get(leaf) in _TEXT_LAYERS:
            reason += _QUOTE_IT
        if not facts.is_known(leaf):  # a section's or the whole model's input: its secrets
            value = masked_input(leaf, value, facts.is_known, facts.secrets)
        problems.append(Problem(leaf, winners.get(leaf, "defaults"), reason, value))
    return problems


def _reason(
    err: ErrorDetails, facts: SchemaFacts, key: str, leaf: str, quoted: Sequence[str]
) -> str:
    """Why pydantic refused ``err``'s value, at ``key`` (within the leaf ``leaf``). For a
    secret key (a key under a secret leaf, one of a mapping of secrets, too) nothing that
    derives from the value is said: a validator's own message is withheld (``reason_for``)
    and pydantic's own says the rule, not the value's length (``refusal_shown``)."""
    secret = (
        key in facts.secrets
        or leaf in facts.secrets
        or any(facts.is_known(k) and hides(k, facts.secrets) for k in (key, leaf))
    )
    if not secret:
        return reason_for(err["type"], err["msg"], facts.secrets, key, leaf, quoted)
    if is_custom(err["type"]):
        return reason_for(err["type"], err["msg"], frozenset({key}), key, leaf)
    return refusal_shown(err["type"], err["msg"], err.get("ctx"))


def not_held(model: BaseModel, key: str) -> str | None:
    """Why the validated ``model`` holds no value at ``key``, a key below a leaf: the model
    or dataclass reached on its path has no field of that name, so it dropped the value
    as an extra one (a key of the other member of a union, ``pet.bark`` while ``pet`` is
    a ``Cat``; the schema has it, so it passed as a key). None if the value is held, or
    may not be: below a mapping (whose validator may leave keys out), a list, a text."""
    node: Any = model
    parts = key.split(".")
    for place, part in enumerate(parts):
        while isinstance(node, RootModel):
            node = node.root
        kind = type(node).__name__
        if isinstance(node, BaseModel):
            extra = node.model_extra or {}
            held = part in type(node).model_fields or part in extra
            node = extra[part] if part in extra else getattr(node, part, None)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            names = {field.name for field in dataclasses.fields(node)}
            held = part in names or part in getattr(node, "__dict__", {})
            node = getattr(node, part, None)
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
            continue
        else:
            return None
        if not held:
            where = ".".join(parts[:place])
            return f"{where} holds a {kind}, which has no field {part!r}: it would drop the value"
    return None


def dropped_inside(model: BaseModel, key: str, given: Mapping[str, Any]) -> list[Problem]:
    """A problem (layer left blank) for each key inside ``given``, the mapping a layer gave
    whole at the leaf ``key``, at which the validated ``model`` holds no value
    (``not_held``): a typo in a model given whole (``inner: {a: 2, zz: 1}`` for ``inner:
    Optional[Inner]``), which pydantic drops without a word, where ``inner.zz`` given alone
    is refused. Only what the model keeps is walked into, and only the values that are
    mappings: a ``dict[str, float]`` costs one look per key."""
    node: Any = model
    for part in key.split("."):
        node = getattr(node, part, None)
    dropped: list[Problem] = []
    stack: list[tuple[Any, Mapping[str, Any], str]] = [(node, given, key)]
    while stack:
        node, given, where = stack.pop()
        while isinstance(node, RootModel):
            node = node.root
        if not isinstance(node, BaseModel | Mapping) and not (
            dataclasses.is_dataclass(node) and not isinstance(node, type)
        ):
            continue  # a list, a text, a secret: nothing in it is a key
        for part, value in given.items():
            inside = f"{where}.{part}"
            reason = not_held(model, inside)
            if reason is not None:
                dropped.append(Problem(inside, "", reason, value))
            elif isinstance(value, Mapping):
                child = node.get(part) if isinstance(node, Mapping) else getattr(node, part, None)
                stack.append((child, value, inside))
    return dropped


def problems_besides(
    schema: type[BaseModel],
    rest: dict[str, Any],
    winners: Mapping[str, str],
    facts: SchemaFacts,
    nest: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> list[Problem]:
    """The schema's problems with ``rest``, the values left once the keys already at fault
    (not a key of the schema, a boolean for a number) are out: so that one typo does not
    hide an out-of-range value beside it (``validate`` of a file lists every problem).
    None where they cannot be told apart from those keys' (a clash, the schema raising)."""
    try:
        validated(schema, nest(rest))
    except ValidationError as exc:
        return refused_problems(schema, exc, rest, winners, facts)
    except Exception:  # the problems already found are the ones reported
        return []
    return []


def not_a_key(key: str, value: Any, leaves: frozenset[str], named: str | None = None) -> str:
    """Why ``key``, which names no leaf, is refused: a section given a value (``train: 5``,
    or ``train:`` with every key under it commented out) is said to be one, and an alias
    (``named``: the key by its fields' names, ``schema.by_field_names``) is named."""
    if named is not None:
        return (
            f"not a key of the schema: an alias of {named} (keys are the fields' names, "
            f"in every layer: write {named})"
        )
    below = sorted(leaf for leaf in leaves if leaf.startswith(key + "."))
    if not below:
        return "not a key of the schema"
    shown = ", ".join(below[:3]) + (", ..." if len(below) > 3 else "")
    if value is None:
        return f"a section given nothing: set its keys ({shown}) or leave it out"
    if isinstance(value, list):  # TOML's ``[[train]]``, YAML's ``- lr: 1``: one too many levels
        return f"a section, not a list: set its keys ({shown}) in it, not in items of a list"
    return f"a section, not one value: set its keys ({shown})"


def validated(schema: type[BaseModel], nested: Mapping[str, Any]) -> BaseModel:
    """``schema`` validated from ``nested``, whose keys are the fields' names (a key is a
    name, ``a``, whatever alias the field reads by: ``Field(alias="A")``), and only names
    (an alias may be another field's name). What the schema's code raises that is no
    ``Exception`` comes out as ``as_fault`` says."""
    try:
        return schema.model_validate(nested, by_alias=False, by_name=True)
    except Exception:
        raise
    except BaseException as exc:
        raise as_fault(exc) from None


def dumped(model: BaseModel, facts: SchemaFacts) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model``'s values, nested and by dotted key (JSON form, secrets revealed); as in
    ``validated``, what the schema's code (a serializer, a computed field) raises that is
    no ``Exception`` comes out as ``as_fault`` says."""
    try:
        dumped = model.model_dump(mode="json", by_alias=False)
        values = reveal_secrets(model, dumped, facts.secrets, facts.leaves)
    except Exception:
        raise
    except BaseException as exc:
        raise as_fault(exc) from None
    flat = leaf_values(values, facts.ordered)
    if facts.computed:
        flat.update(computed_values(values, facts.computed))
    return values, flat


def reveal_secrets(
    model: BaseModel, values: dict[str, Any], secrets: frozenset[str], leaves: frozenset[str]
) -> dict[str, Any]:
    """``values`` with each secret leaf's real value, not pydantic's ``**********`` (also
    in a leaf that holds secrets: a model, a mapping of them). A computed field is left as
    the dump made it (a serializer of the schema's may have made it).

    Clients need the real value (they get it over a socket only their own user can
    open); everything that shows values to people masks them (``mask_secrets``).
    """
    for key in secrets:
        if key not in leaves:
            continue
        node: Any = model
        for part in key.split("."):
            node = getattr(node, part, None)
        *sections, leaf = key.split(".")
        target = values
        for part in sections:
            target = target[part]
        if leaf in target:
            target[leaf] = revealed(node)
    return values
