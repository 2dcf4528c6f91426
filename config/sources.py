"""The layer sources: defaults, files, etcd, env and CLI, each read into a ``Layer``
(the env layer in ``environ``).

A ``Layer`` is one source's say: a flat mapping of dotted keys to plain values,
and for each key where it came from (a file, an env var, an etcd key). No
source validates; the merge does that for the whole candidate at once, so a
problem is reported with the key and the layer it came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel

from .errors import InvalidChange, Problem, SchemaLoadError, UsageError
from .files import read_config_file
from .keys import (
    LONE_SURROGATE,
    NotText,
    etcd_path_fault,
    flatten,
    is_text,
    key_from_etcd,
    parse_text,
    shown_text,
)
from .raised import SCHEMA_FAULTS, one_line, raised_in_schema, schema_code
from .schema import iter_leaves
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


def leaf_keys(schema: type[BaseModel]) -> frozenset[str]:
    """Every leaf's dotted key: where ``flatten`` stops (a leaf may hold a mapping)."""
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
    sections: dict[tuple[str, ...], Any] = {}  # each section's default, made once
    for leaf in iter_leaves(schema):
        try:
            default = schema_code(_leaf_default, schema, leaf.key.split("."), sections)
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


def _leaf_default(
    schema: type[BaseModel], path: list[str], sections: dict[tuple[str, ...], Any]
) -> Any:
    """The default of the leaf at ``path``; ``_ABSENT`` if pydantic makes none by itself.
    ``sections``: the defaults of the sections made so far, by path, made once each (a
    section's default is a copy each time it is made: once per leaf, a section of
    thousands of leaves took seconds)."""
    model: Any = schema
    made: Any = _ABSENT  # the default of the section reached so far, once one has one
    for depth, part in enumerate(path, 1):
        field = model.model_fields[part]
        if made is not _ABSENT:  # what the section's default holds, if it holds it
            made = made.get(part, _ABSENT) if isinstance(made, Mapping) else getattr(made, part)
        if made is _ABSENT:  # else the field's own default (a section's, inside a dict)
            if field.is_required() or getattr(field, "default_factory_takes_validated_data", False):
                return _ABSENT
            if depth < len(path):
                key = tuple(path[:depth])
                if key not in sections:
                    sections[key] = field.get_default(call_default_factory=True)
                made = sections[key]
            else:
                made = field.get_default(call_default_factory=True)
        model = field.annotation
    return made


# --- files -------------------------------------------------------------------------------------


def files_layer(schema: type[BaseModel], files: Sequence[tuple[Path, Mapping[str, Any]]]) -> Layer:
    """Merge parsed files in order (a later file wins key by key)."""
    leaves = leaf_keys(schema)
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
