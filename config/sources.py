"""The layer sources: defaults, files, etcd, env and CLI, each read into a ``Layer``.

A ``Layer`` is one source's say: a flat mapping of dotted keys to plain values,
and for each key where it came from (a file, an env var, an etcd key). No
source validates; the merge does that for the whole candidate at once, so a
problem is reported with the key and the layer it came from.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, create_model
from pydantic_settings import EnvSettingsSource
from pydantic_settings.exceptions import SettingsError

from .errors import InvalidChange, LayerError, Problem, SchemaLoadError, UsageError
from .files import read_config_file
from .keys import (
    LONE_SURROGATE,
    DuplicateKey,
    NotText,
    etcd_path_fault,
    flatten,
    is_text,
    key_from_etcd,
    parse_text,
    shown_text,
)
from .raised import SCHEMA_FAULTS, one_line, raised_in_schema, schema_code
from .schema import is_section, iter_leaves, may_hold_container
from .secrecy import revealed, secret_keys

LAYERS = ("defaults", "files", "etcd", "env", "cli")
LIVE_LAYERS = frozenset({"files", "etcd"})
DEFAULT_ENV_PREFIX = "HOTKNOB_PARAM_"


@dataclass(frozen=True)
class Layer:
    """One source's values (flat dotted keys), where each came from, and what it could not read."""

    name: str
    values: Mapping[str, Any] = field(default_factory=dict)
    origins: Mapping[str, str] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "origins", MappingProxyType(dict(self.origins)))

    def without(self, keys: Iterable[str]) -> Layer:
        """This layer less ``keys`` and their problems (used to drop rejected keys)."""
        drop = set(keys)
        return Layer(
            self.name,
            {k: v for k, v in self.values.items() if k not in drop},
            {k: v for k, v in self.origins.items() if k not in drop},
            tuple(p for p in self.problems if p.key not in drop),
        )


def _leaf_keys(schema: type[BaseModel]) -> frozenset[str]:
    return frozenset(leaf.key for leaf in iter_leaves(schema))


def defaults_layer(schema: type[BaseModel]) -> Layer:
    """The schema's own defaults, each leaf's as pydantic would make it: from the default
    of the section that holds it where that section has one (``i: Inner = Inner(a=7)``),
    else its own. A required field is absent, so are the leaves of a required section, and
    so is a field whose default factory takes the other fields' values (pydantic makes
    that default as it validates). Raises ``SchemaLoadError`` for a default that cannot be
    made or turned into JSON (its factory raised): the schema itself is broken."""
    values: dict[str, Any] = {}
    secrets = secret_keys(schema)
    for leaf in iter_leaves(schema):
        try:
            default = schema_code(_leaf_default, schema, leaf.key.split("."))
            if default is not _ABSENT:
                # Secrets as their values, not their "****" rendering (also inside a model).
                values[leaf.key] = schema_code(revealed, default)
        except SCHEMA_FAULTS as caught:
            exc = raised_in_schema(caught)
            message = "" if leaf.key in secrets else one_line(exc)  # it may quote the secret
            said = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
            raise SchemaLoadError(
                f"the schema's default of {leaf.key} cannot be made: {said}"
            ) from None
    return Layer("defaults", values, dict.fromkeys(values, "schema"))


_ABSENT: Any = object()


def _leaf_default(schema: type[BaseModel], path: list[str]) -> Any:
    """The default of the leaf at ``path``; ``_ABSENT`` if pydantic makes none by itself."""
    model: Any = schema
    made: Any = _ABSENT  # the default of the section reached so far, once one has one
    for part in path:
        field = model.model_fields[part]
        if made is not _ABSENT:  # what the section's default holds, if it holds it
            made = made.get(part, _ABSENT) if isinstance(made, Mapping) else getattr(made, part)
        if made is _ABSENT:  # else the field's own default (a section's, inside a dict)
            if field.is_required() or getattr(field, "default_factory_takes_validated_data", False):
                return _ABSENT
            made = field.get_default(call_default_factory=True)
        model = field.annotation
    return made


# --- files -------------------------------------------------------------------------------------


def files_layer(schema: type[BaseModel], files: Sequence[tuple[Path, Mapping[str, Any]]]) -> Layer:
    """Merge parsed files in order (a later file wins key by key)."""
    leaves = _leaf_keys(schema)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for path, nested in files:
        for key, value in flatten(nested, leaves=leaves).items():
            values[key] = value
            origins[key] = str(path)
    return Layer("files", values, origins)


def read_files_layer(schema: type[BaseModel], paths: Sequence[Path]) -> Layer:
    return files_layer(schema, [(Path(p), read_config_file(Path(p))) for p in paths])


# --- etcd --------------------------------------------------------------------------------------


def etcd_layer(
    app: str, kvs: Mapping[str, bytes | str], *, faults: list[Problem] | None = None
) -> Layer:
    """The etcd layer from a consistent prefix read (full etcd path -> raw value); with
    ``faults``, the paths that name no key go there instead of into the layer's problems
    (``read_etcd_values``)."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    problems: list[Problem] = []
    read_etcd_values(app, kvs, values, origins, problems, faults=faults)
    return Layer("etcd", values, origins, tuple(problems))


def read_etcd_values(
    app: str,
    kvs: Mapping[str, bytes | str],
    values: dict[str, Any],
    origins: dict[str, str],
    problems: list[Problem],
    *,
    faults: list[Problem] | None = None,
) -> None:
    """Parse etcd paths and raw values into ``values`` and ``origins`` (by dotted key);
    a value that cannot be read goes to ``problems``, and so does a path under the prefix
    that names no key (``etcd_path_fault``), by its whole path, so that it can never be
    taken for a real key. Paths outside ``app`` are skipped.

    Such a path goes to ``faults`` instead, if given: a caller that ignores it (with a
    warning) while it takes or refuses the values of the keys as they are. It is no key,
    so it cannot make a configuration invalid."""
    for path, raw in kvs.items():
        key = key_from_etcd(app, path)
        if key is None:
            fault = etcd_path_fault(app, path)
            if fault is not None:
                found = Problem(shown_text(path), "etcd", fault)
                (problems if faults is None else faults).append(found)
            continue
        origins[key] = path
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            problems.append(Problem(key, "etcd", "value is not valid UTF-8"))
            continue
        try:
            values[key] = parse_text(text)
        except NotText as exc:
            problems.append(Problem(key, "etcd", str(exc)))


# --- env ---------------------------------------------------------------------------------------


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
    leaves = _leaf_keys(schema)
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
            reason = (
                f"{exc.msg} at character {exc.pos}"
                if isinstance(exc, json.JSONDecodeError)
                else str(exc)
            )
            return f"{shown_text(name)} ({key}): not valid JSON: {reason}"
    return None


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
    leaves = {key.lower(): key for key in _leaf_keys(schema)}  # a variable's case is none
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


# --- cli ---------------------------------------------------------------------------------------


def parse_assignment(text: str) -> tuple[str, Any]:
    """``train.lr=0.0003`` -> ``("train.lr", 0.0003)``; the value is JSON text or a bare word.

    Raises ``UsageError`` for text that is not ``KEY=VALUE``, and ``InvalidChange`` (layer
    ``cli``) for a key or value that holds a lone surrogate (``"\\ud800"``, or a byte that
    is not UTF-8 in the argument)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UsageError(f"expected KEY=VALUE (e.g. train.lr=0.0003), got {text!r}")
    if not is_text(key):
        raise InvalidChange([Problem(shown_text(key), "cli", f"the key is {LONE_SURROGATE}")])
    try:
        return key, parse_text(value)
    except NotText as exc:
        raise InvalidChange([Problem(key, "cli", str(exc))]) from None


def cli_layer(assignments: Sequence[str]) -> Layer:
    """The ``--set`` assignments; a value that is not valid text is a problem of the layer."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for text in assignments:
        try:
            key, value = parse_assignment(text)
        except InvalidChange as exc:
            problems.extend(exc.problems)
            continue
        values[key] = value
    return Layer("cli", values, dict.fromkeys(values, "--set"), tuple(problems))
