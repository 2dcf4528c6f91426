"""The env layer: ``PREFIX_SECTION__FIELD=<json text>`` variables, read with
pydantic-settings' env source (``env_layer``).

pydantic-settings reads the variables the schema's fields name; around it, this module
says what it would drop or take without a word: a variable that names no field (a typo
in a container spec), a key given twice (by its own variable and inside a section's
JSON, or in two spellings of one name), a key inside a mapping (set as ``--set
weights.head`` sets it, not made the whole mapping), a ``null`` for a field that may
hold a model, JSON that does not parse (naming the variable, never its value), and a
value that is not text.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, create_model
from pydantic_settings import EnvSettingsSource
from pydantic_settings.exceptions import SettingsError

from .errors import LayerError, Problem
from .keys import LONE_SURROGATE, DuplicateKey, NotText, flatten, is_text, parse_text, shown_text
from .schema import is_section, iter_leaves, may_hold_container
from .secrecy import hides, secret_keys
from .sources import DEFAULT_ENV_PREFIX, Layer, leaf_keys

__all__ = ["env_layer"]


def env_layer(
    schema: type[BaseModel],
    prefix: str = DEFAULT_ENV_PREFIX,
    environ: Mapping[str, str] | None = None,
) -> Layer:
    """``PREFIX_SECTION__FIELD=<json text>`` variables, read with pydantic-settings' env source.

    A variable with the prefix that names no field is reported as a problem
    rather than ignored, so a typo in a container spec does not go unnoticed.
    """
    source = EnvSettingsSource(
        _by_name(schema),  # type: ignore[arg-type]  # any model works: it reads only the fields
        env_prefix=prefix,
        env_nested_delimiter="__",
        case_sensitive=False,
    )
    if environ is None:
        environ = os.environ
    # A variable for a key inside a mapping (``PREFIX_WEIGHTS__HEAD``) sets that key, as
    # ``--set weights.head`` does: pydantic-settings would make it the whole mapping, its
    # value left as text. The source reads the others.
    inside, others = _keys_inside_mappings(schema, prefix, environ)
    source.env_vars = {name.lower(): value for name, value in others.items()}
    try:
        nested = source()
    except SettingsError as exc:
        said = _not_json(schema, prefix, others)  # which variable, which key, and why
        raise LayerError("env", said or f"environment variable under {prefix}: {exc}") from exc
    leaves = leaf_keys(schema)
    values: dict[str, Any] = {}
    problems = []
    for key, value in flatten(nested, leaves=leaves).items():
        # A byte that is not UTF-8 in a variable reaches Python as a lone surrogate, and
        # pydantic-settings decodes a section's JSON itself: check what it gives, too.
        try:
            values[key] = _env_value(value)
        except DuplicateKey:
            continue  # said below, of the variable's own text
        except NotText:
            name = prefix + key.upper().replace(".", "__")
            problems.append(Problem(shown_text(key), "env", f"{name}: {LONE_SURROGATE}"))
    # pydantic-settings decodes a section's or a container's JSON itself, keeping the last
    # of a key given twice: each variable's own text says so.
    lowered = prefix.lower()
    for name, text in others.items():
        if name.lower().startswith(lowered):
            try:
                parse_text(text)
            except DuplicateKey as exc:
                key = _env_key(prefix, name)
                problems.append(Problem(shown_text(key), "env", f"{shown_text(name)}: {exc}"))
            except NotText:
                pass  # a lone surrogate: said of the value pydantic-settings gave
    for key, (name, text) in inside.items():
        try:
            values[key] = parse_text(text)
        except NotText as exc:
            problems.append(Problem(shown_text(key), "env", f"{shown_text(name)}: {exc}"))
    values.update(_nulls_of_fields(schema, prefix, others, values))
    origins = {key: prefix + key.upper().replace(".", "__") for key in values}
    problems.extend(_given_twice(prefix, environ))
    spelled: dict[str, str] = {}  # each variable's name in lower case: the first spelling
    fields = {field.lower() for field in schema.model_fields}
    for name in environ:
        if name.lower().startswith(lowered):
            key = _env_key(prefix, name)
            first = spelled.setdefault(name.lower(), name)
            if first != name:  # case does not count: which one wins would be chance
                problems.append(
                    Problem(
                        shown_text(key),
                        "env",
                        f"{shown_text(first)} and {shown_text(name)} both set it (the case "
                        "of a name does not count): keep one",
                    )
                )
            top = key.split(".", 1)[0]
            if top not in fields:
                shown = shown_text(name)
                problems.append(
                    Problem(shown_text(key), "env", f"{shown} names no field of the schema")
                )
    return Layer("env", values, origins, tuple(problems))


def _env_key(prefix: str, name: str) -> str:
    """The dotted key a variable under ``prefix`` names, in lower case (``PREFIX_TRAIN__LR``:
    ``train.lr``)."""
    return name[len(prefix) :].lower().replace("__", ".")


def _nulls_of_fields(
    schema: type[BaseModel], prefix: str, environ: Mapping[str, str], values: Mapping[str, Any]
) -> dict[str, None]:
    """The fields of the model itself whose variable holds ``null`` and that no other
    variable gives a value at or below: pydantic-settings reads such a variable as JSON
    where the field may hold a model, a list or a mapping (``PREFIX_OPT`` for ``opt:
    Optional[Creds]``), and drops the ``None`` it gets. That ``null`` is a value as
    ``--set opt=null`` gives it: it overrides a lower layer's, and a section's is refused
    as a file's ``train:`` with nothing under it is."""
    fields = {name.lower(): name for name in schema.model_fields}
    lowered = prefix.lower()
    nulls: dict[str, None] = {}
    for name, text in environ.items():
        if not name.lower().startswith(lowered):
            continue
        field_name = fields.get(name[len(prefix) :].lower())
        if field_name is None or field_name in values:
            continue
        if any(key.startswith(field_name + ".") for key in values):
            continue
        try:
            if parse_text(text) is None:
                nulls[field_name] = None
        except NotText:
            continue
    return nulls


_MISSING: Any = object()


def _given_twice(prefix: str, environ: Mapping[str, str]) -> list[Problem]:
    """A problem for each key that two variables under ``prefix`` give: one the key's own
    (``PREFIX_TRAIN__LR``), the other a section or mapping holding it as JSON
    (``PREFIX_TRAIN='{"lr": 0.5}'``), or ``null`` for it all (``PREFIX_OPT=null``).
    pydantic-settings would keep one of them and drop the other without a word; a file
    that gives a key twice is refused, and so is this."""
    lowered = prefix.lower()
    named = {
        name: name[len(prefix) :].lower().split("__")
        for name in environ
        if name.lower().startswith(lowered)
    }
    problems: list[Problem] = []
    for outer, outer_parts in named.items():
        depth = len(outer_parts)
        whole: Any = _MISSING
        for inner, inner_parts in named.items():
            if len(inner_parts) <= depth or inner_parts[:depth] != outer_parts:
                continue
            if whole is _MISSING:
                try:
                    whole = json.loads(environ[outer])
                except (ValueError, RecursionError):
                    break  # not JSON: read as text, so it gives no key below it
            node = whole
            for part in inner_parts[depth:] if whole is not None else ():  # null: none
                if not isinstance(node, Mapping):
                    break
                node = next((v for k, v in node.items() if str(k).lower() == part), _MISSING)
                if node is _MISSING:
                    break
            else:
                problems.append(
                    Problem(
                        shown_text(".".join(inner_parts)),
                        "env",
                        f"{shown_text(outer)} and {shown_text(inner)} both set it: keep one",
                    )
                )
    return problems


def _not_json(schema: type[BaseModel], prefix: str, environ: Mapping[str, str]) -> str | None:
    """The first variable under ``prefix`` that pydantic-settings reads as JSON (a section,
    or a field that may hold a list or a mapping) and that is not JSON, as a line naming
    it, its key and the parser's reason (not the value: it may be a secret); else None."""
    leaves = {leaf.key: leaf for leaf in iter_leaves(schema)}
    lowered = prefix.lower()
    for name, value in environ.items():
        if not name.lower().startswith(lowered):
            continue
        dotted = _env_key(prefix, name)
        key = next((k for k in leaves if k.lower() == dotted), None)
        if key is not None:
            complex_value = may_hold_container(leaves[key].field.annotation)
        else:
            key = next((k for k in leaves if k.lower().startswith(dotted + ".")), None)
            complex_value = key is not None
            key = key[: len(dotted)] if key is not None else None
        if not complex_value or key is None:
            continue
        try:
            json.loads(value)
        except ValueError as exc:
            if _holds_secret(schema, key):  # where the text broke tells of the secret in it
                return (
                    f"{shown_text(name)} ({key}): not valid JSON (the reason is withheld: secret)"
                )
            reason = (
                f"{exc.msg} at character {exc.pos}"
                if isinstance(exc, json.JSONDecodeError)
                else str(exc)
            )
            return f"{shown_text(name)} ({key}): not valid JSON: {reason}"
    return None


def _holds_secret(schema: type[BaseModel], key: str) -> bool:
    """Whether the value given for ``key`` (a leaf, or a section as a whole) may hold a
    secret: ``key`` is hidden (``hides``) or a secret leaf is under it."""
    secrets = secret_keys(schema)
    return hides(key, secrets) or any(s.startswith(f"{key}.") for s in secrets)


def _keys_inside_mappings(
    schema: type[BaseModel], prefix: str, environ: Mapping[str, str]
) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """The variables under ``prefix`` that name a key inside a leaf (by dotted key: the
    variable's name and value), and all the others.

    Inside a leaf that holds a mapping such a key is one, as ``--set weights.head`` is;
    inside any other leaf it is none, and the merge refuses it by its own name, as it
    does ``--set seed.x``. pydantic-settings would drop it (``PREFIX_SEED__X``, for a
    field ``seed`` of the model itself: a typo gone unnoticed) or make it the leaf's
    value (``PREFIX_TRAIN__LR__X``: refused as ``train.lr``, not a number)."""
    leaves = {key.lower(): key for key in leaf_keys(schema)}  # a variable's case is none
    lowered = prefix.lower()
    inside: dict[str, tuple[str, str]] = {}
    others: dict[str, str] = {}
    for name, value in environ.items():
        if name.lower().startswith(lowered):
            parts = name[len(prefix) :].lower().split("__")
            for end in range(1, len(parts)):
                leaf = leaves.get(".".join(parts[:end]))
                if leaf is not None:
                    inside[".".join([leaf, *parts[end:]])] = (name, value)
                    break
            else:
                others[name] = value
            continue
        others[name] = value
    return inside, others


@lru_cache(maxsize=16)
def _by_name(schema: type[BaseModel]) -> type[BaseModel]:
    """``schema`` as the env source is to read it: every field, in every section, by its
    name, as every key is (``PREFIX_SEC__A``), never by an alias (pydantic-settings reads
    an aliased field from the variable its alias names, without the prefix: an alias
    ``path`` would read ``PATH``). ``schema`` itself if it has no alias."""
    if not _aliased(schema):
        return schema
    fields: dict[str, Any] = {}
    for name, info in schema.model_fields.items():
        plain = copy.copy(info)
        plain.alias = plain.validation_alias = plain.serialization_alias = None
        plain.alias_priority = None
        annotation = info.annotation
        if is_section(annotation):
            annotation = _by_name(annotation)
        fields[name] = (annotation, plain)
    return create_model(schema.__name__, **fields)


def _aliased(schema: type[BaseModel]) -> bool:
    return any(
        info.alias is not None
        or info.validation_alias is not None
        or (is_section(info.annotation) and _aliased(info.annotation))
        for info in schema.model_fields.values()
    )


def _env_value(value: Any) -> Any:
    """A variable's value as pydantic-settings gave it: its text parsed, else as it is;
    raises ``NotText`` if it holds a lone surrogate."""
    if isinstance(value, str):
        return parse_text(value)
    if not is_text(value):
        raise NotText()
    return value
