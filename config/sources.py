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
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import BaseModel, create_model
from pydantic_settings import EnvSettingsSource
from pydantic_settings.exceptions import SettingsError

from .errors import InvalidChange, LayerError, Problem, SchemaLoadError, UsageError
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
from .raised import SCHEMA_FAULTS, one_line
from .schema import is_section, iter_leaves, mapping_keys, revealed, secret_keys

LAYERS = ("defaults", "files", "etcd", "env", "cli")
LIVE_LAYERS = frozenset({"files", "etcd"})
DEFAULT_ENV_PREFIX = "HOTKNOB_PARAM_"
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_FILE_DEPTH = 64  # mappings and lists within one another: far beyond any real config
FILE_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}


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
            default = _leaf_default(schema, leaf.key.split("."))
            if default is not _ABSENT:
                # Secrets as their values, not their "****" rendering (also inside a model).
                values[leaf.key] = revealed(default)
        except SCHEMA_FAULTS as exc:
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


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and YAML aliases (no alias bombs)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases are not allowed in config files", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # a list or mapping as a key (``? [a, b]``)
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "found unhashable key",
                    key_node.start_mark,
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _json_object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_config_text(text: str, kind: str) -> Any:
    if kind == "yaml":
        return yaml.load(text, Loader=_StrictYamlLoader)
    if kind == "toml":
        return tomllib.loads(text)
    return json.loads(
        text, object_pairs_hook=_json_object_no_duplicates, parse_constant=_reject_json_constant
    )


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse one config file (YAML, TOML or JSON by extension) into a nested dict.

    Raises ``LayerError`` (layer ``files``) naming the file and the reason for a
    missing, unreadable, empty, oversized, non-UTF-8 or unparsable file, one nested
    more than ``MAX_FILE_DEPTH`` levels deep, one whose top level is not a mapping, or
    one with a lone surrogate (an escape such as ``"\\ud800"``, which JSON and YAML
    allow and UTF-8 cannot carry) in a key or a value.
    What it returns is at most that deep, so code that walks it recursively is safe.
    """
    path = Path(path)
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LayerError(
            "files", f"{path}: unknown config format {path.suffix!r} (use .yaml, .toml or .json)"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise LayerError("files", f"{path}: no such file") from None
    except OSError as exc:
        raise LayerError("files", f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise LayerError("files", f"{path}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LayerError("files", f"{path}: not valid UTF-8 (byte {exc.start})") from exc
    if not text.strip():
        raise LayerError("files", f"{path}: file is empty")
    try:
        parsed = parse_config_text(text, kind)
    except RecursionError:
        raise LayerError("files", _too_deep(path)) from None
    except Exception as exc:
        if kind == "yaml" and not isinstance(exc, yaml.YAMLError):
            # An explicit tag on a value that is not of its kind (``!!int abc``, ``!!bool
            # x``): PyYAML's constructor raises whatever its conversion raises, quoting
            # the value (which may be a secret), with no position.
            reason = _YAML_TAG_FAILED.format(type(exc).__name__)
        elif isinstance(exc, yaml.YAMLError | tomllib.TOMLDecodeError | ValueError):
            reason = " ".join(_parse_error_text(exc).split())
        else:
            raise
        # Not ``from exc``: a traceback of the chain would print PyYAML's own text, which
        # quotes a line of the file.
        raise LayerError("files", f"{path}: not valid {kind.upper()}: {reason}") from None
    if not isinstance(parsed, dict):
        raise LayerError("files", f"{path}: the top level must be a mapping of sections")
    if _depth_exceeds(parsed, MAX_FILE_DEPTH):
        raise LayerError("files", _too_deep(path))
    where = _lone_surrogate_at(parsed) if "\\" in text else None  # only escapes make one
    if where is not None:
        raise LayerError("files", f"{path}: {where}: {LONE_SURROGATE}", key=where)
    return parsed


_YAML_TAG_FAILED = (
    "a value could not be made into the type its explicit tag names (such as !!int, "
    "!!float, !!bool or !!timestamp; {}); drop the tag or fix the value"
)


def _parse_error_text(exc: Exception) -> str:
    """Why a file could not be parsed, by line and column, without the file's content.

    PyYAML's own text of a ``MarkedYAMLError`` quotes the line it stopped at (with a caret
    under the column), and that line may hold a secret (``api_key: s3cret``): it is built
    here from the error's problem, context and marks instead. So are the few problems that
    quote a name taken from the text (a tag, an anchor), as a value starting with ``!`` or
    ``&`` that was meant as a string is read as one. The errors of ``tomllib`` and ``json``
    name a position only (and a key, or a single character), so their text is kept."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)
    context, problem = _yaml_unquoted(exc.context), _yaml_unquoted(exc.problem)
    context_mark, problem_mark = exc.context_mark, exc.problem_mark
    parts = []
    if context is not None:
        same = (
            problem_mark is not None
            and context_mark is not None
            and (context_mark.line, context_mark.column) == (problem_mark.line, problem_mark.column)
        )
        parts.append(context if same else context + _yaml_at(context_mark))
    if problem is not None:
        parts.append(problem + _yaml_at(problem_mark))
    if exc.note is not None:
        parts.append(exc.note)
    return "; ".join(parts) or type(exc).__name__


_YAML_QUOTING = {
    "could not determine a constructor for the tag ": (
        "could not determine a constructor for a tag (quote a value that starts with '!')"
    ),
    "found undefined tag handle ": (
        "found an undefined tag handle (quote a value that starts with '!')"
    ),
    "duplicate tag handle ": "duplicate tag handle",
    "found undefined alias ": "found an undefined alias",
    "found duplicate anchor ": "found a duplicate anchor; first occurrence",
}
"""The problems of PyYAML that quote a name read from the text, by how they begin, and
what is said instead."""


def _yaml_unquoted(text: str | None) -> str | None:
    if text is None:
        return None
    for start, instead in _YAML_QUOTING.items():
        if text.startswith(start):
            return instead
    return text


def _yaml_at(mark: yaml.Mark | None) -> str:
    return "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"


def _lone_surrogate_at(parsed: dict[str, Any]) -> str | None:
    """The dotted path (printable) of the first key or value of ``parsed`` that holds a
    lone surrogate; None if there is none. ``parsed`` is at most ``MAX_FILE_DEPTH`` deep."""
    for name, value in parsed.items():
        shown = shown_text(str(name))
        if not is_text(name):
            return shown
        if isinstance(value, dict):
            below = _lone_surrogate_at(value)
            if below is not None:
                return f"{shown}.{below}"
        elif not is_text(value):
            return shown
    return None


def _too_deep(path: Path) -> str:
    return f"{path}: nested too deeply (more than {MAX_FILE_DEPTH} levels)"


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether mappings and lists lie more than ``limit`` levels within one another (without
    recursion: a parser accepts depths that a recursive walk does not survive)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


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
        except NotText:
            problems.append(Problem(key, "etcd", LONE_SURROGATE))


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
        raise LayerError("env", f"environment variable under {prefix}: {exc}") from exc
    leaves = _leaf_keys(schema)
    values: dict[str, Any] = {}
    problems = []
    for key, value in flatten(nested, leaves=leaves).items():
        # A byte that is not UTF-8 in a variable reaches Python as a lone surrogate, and
        # pydantic-settings decodes a section's JSON itself: check what it gives, too.
        try:
            values[key] = _env_value(value)
        except NotText:
            name = prefix + key.upper().replace(".", "__")
            problems.append(Problem(shown_text(key), "env", f"{name}: {LONE_SURROGATE}"))
    for key, (name, text) in inside.items():
        try:
            values[key] = parse_text(text)
        except NotText:
            problems.append(Problem(shown_text(key), "env", f"{name}: {LONE_SURROGATE}"))
    origins = {key: prefix + key.upper().replace(".", "__") for key in values}
    lowered = prefix.lower()
    for name in environ:
        if name.lower().startswith(lowered):
            key = name[len(prefix) :].lower().replace("__", ".")
            top = key.split(".", 1)[0]
            if top not in {field.lower() for field in schema.model_fields}:
                shown = shown_text(name)
                problems.append(
                    Problem(shown_text(key), "env", f"{shown} names no field of the schema")
                )
    return Layer("env", values, origins, tuple(problems))


def _keys_inside_mappings(
    schema: type[BaseModel], prefix: str, environ: Mapping[str, str]
) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """The variables under ``prefix`` that name a key inside a leaf holding a mapping (by
    dotted key: the variable's name and value), and all the others."""
    mappings = {key.lower(): key for key in mapping_keys(schema)}  # a variable's case is none
    lowered = prefix.lower()
    inside: dict[str, tuple[str, str]] = {}
    others: dict[str, str] = {}
    for name, value in environ.items():
        if name.lower().startswith(lowered):
            parts = name[len(prefix) :].lower().split("__")
            for end in range(1, len(parts)):
                leaf = mappings.get(".".join(parts[:end]))
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
    except NotText:
        raise InvalidChange([Problem(key, "cli", LONE_SURROGATE)]) from None


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
