"""The built-in parameter schema, the restart-only marker, and loading a user's schema.

A schema is any pydantic model whose fields are sections (nested models) or
leaves. Keys are dotted paths into it (``train.lr``). A leaf marked
``json_schema_extra={"live": False}`` is restart-only: the daemon never
hot-pushes it and reports a change to it as pending a restart. Which leaves hold
secrets, and how values are masked, is ``secrecy``'s job; which types read ``true`` as
a number, ``bools_as_numbers``'.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import importlib
import os
import sys
import typing
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import PurePath
from types import UnionType
from typing import Annotated, Any, Literal, TypeGuard, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from typing_extensions import is_typeddict

from .errors import SchemaLoadError

RESTART_ONLY: dict[str, Any] = {"live": False}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class TrainParams(_Section):
    lr: float = Field(1e-3, gt=0, description="base learning rate")
    weight_decay: float = Field(0.0, ge=0, description="L2 / decoupled weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum, or beta1 for Adam")
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm; null = off")
    warmup_steps: int = Field(0, ge=0, description="linear warmup length in steps")
    batch_size: int = Field(32, gt=0, description="batch size", json_schema_extra=RESTART_ONLY)


class SamplingSchema(_Section):
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass kept")
    top_k: int = Field(0, ge=0, description="0 = off")
    min_p: float = Field(0.0, ge=0, lt=1, description="drop tokens below min_p * max prob")
    repetition_penalty: float = Field(1.0, gt=0, description="1 = off")
    max_new_tokens: int = Field(256, gt=0, description="tokens generated per request")


class MLParams(BaseModel):
    """hotknob's built-in schema: a ``train`` and a ``sampling`` section."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    train: TrainParams = Field(default_factory=TrainParams)
    sampling: SamplingSchema = Field(default_factory=SamplingSchema)


DEFAULT_SCHEMA = "hotknob.config.schema:MLParams"


@dataclass(frozen=True)
class Leaf:
    """A leaf field of a schema: its dotted key and whether it may be hot-pushed."""

    key: str
    field: FieldInfo
    live: bool


def is_section(annotation: Any) -> TypeGuard[type[BaseModel]]:
    """A field typed as a model is a section, its fields keys below it; a ``RootModel``
    (one value, not fields) is a leaf."""
    return (
        isinstance(annotation, type)
        and issubclass(annotation, BaseModel)
        and not getattr(annotation, "__pydantic_root_model__", False)
    )


def by_field_names(model: type[BaseModel], key: str) -> str | None:
    """``key`` with the aliases in it (``Field(alias=...)``, a ``validation_alias`` or one
    of its choices) read as their fields' names, if it has one and names a field or a
    section then; else None. Keys are the fields' names in every layer: this only tells a
    user who wrote an alias which name to write."""
    parts, names = key.split("."), []
    section: type[BaseModel] | None = model
    aliased = False
    for part in parts:
        if section is None:
            return None
        fields = section.model_fields
        if part in fields:
            name = part
        else:
            name = next((n for n, f in fields.items() if part in _aliases(f)), "")
            if not name:
                return None
            aliased = True
        names.append(name)
        annotation = fields[name].annotation
        section = annotation if is_section(annotation) else None
    return ".".join(names) if aliased else None


def _aliases(field: FieldInfo) -> set[str]:
    found = {field.alias} if isinstance(field.alias, str) else set()
    given = field.validation_alias
    if isinstance(given, str):
        found.add(given)
    for choice in getattr(given, "choices", ()):  # ``AliasChoices``
        if isinstance(choice, str):
            found.add(choice)
    return found


def _is_live(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("live") is False)


def iter_leaves(model: type[BaseModel], prefix: str = "") -> Iterator[Leaf]:
    """Every leaf of ``model`` in declaration order, nested sections flattened."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if is_section(field.annotation):
            yield from iter_leaves(field.annotation, f"{key}.")
        else:
            yield Leaf(key, field, _is_live(field))


def computed_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The dotted keys of the computed fields of ``model`` and of its sections, and their
    types: values the schema makes from its fields and dumps beside them, which no layer
    sets."""
    for name, computed in model.model_computed_fields.items():
        yield f"{prefix}{name}", computed.return_type
    for name, field in model.model_fields.items():
        if is_section(field.annotation):
            yield from computed_fields(field.annotation, f"{prefix}{name}.")


def holds_mapping(annotation: Any) -> bool:
    """Whether a leaf of this type may hold a mapping (``dict[str, float]``, an optional model
    or dict, ``Any``): only below such a leaf may a dotted key go on (``weights.head``)."""
    if annotation is Any or annotation is object:
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return holds_mapping(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        return any(holds_mapping(arg) for arg in get_args(annotation))
    kind = origin if origin is not None else annotation
    return isinstance(kind, type) and (
        issubclass(kind, Mapping | BaseModel) or dataclasses.is_dataclass(kind)
    )


@lru_cache(maxsize=256)
def _dataclass_inputs(kind: type) -> dict[str, Any]:
    """The fields a (standard or pydantic) dataclass takes, and their types (``Any`` where
    the annotations cannot be resolved); resolved once per class (the caller only reads)."""
    hints = _type_hints(kind)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(kind) if f.init}


@lru_cache(maxsize=256)
def _type_hints(kind: type) -> dict[str, Any]:
    """``kind``'s resolved annotations (none where they cannot be resolved); once per class
    (the caller only reads)."""
    try:
        return typing.get_type_hints(kind, include_extras=True)
    except Exception:  # a forward reference that does not resolve: validation decides
        return {}


def field_types(kind: Any) -> tuple[Any, ...] | None:
    """The types of the fields of a model, a (standard or pydantic) dataclass or a
    TypedDict (``Any`` where the annotations cannot be resolved), each field's, also one
    not taken at init (it is dumped all the same); None for any other type."""
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return tuple(field.annotation for field in kind.model_fields.values())
    if is_typeddict(kind):
        return tuple(_type_hints(kind).values())
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = _type_hints(kind)
        return tuple(hints.get(f.name, Any) for f in dataclasses.fields(kind))
    return None


def may_hold_container(annotation: Any) -> bool:
    """Whether a value of this type may be or hold a list or a mapping (which a validator
    could edit in place): anything but a number, a text, a date, an enum and the like."""
    if annotation is Any or annotation is object:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return False
    if origin is Annotated:
        return may_hold_container(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        return any(may_hold_container(arg) for arg in get_args(annotation))
    if origin is not None or not isinstance(annotation, type):
        return True  # ``list[int]``, ``dict[str, float]``, ``tuple[int, int]``...
    return not issubclass(annotation, _SCALARS)


_SCALARS = (
    int,
    float,
    str,
    bytes,
    Enum,
    type(None),
    datetime.date,
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    uuid.UUID,
    PurePath,
)


def mapping_keys(model: type[BaseModel]) -> frozenset[str]:
    """The leaves of ``model`` that hold a mapping (see ``holds_mapping``)."""
    return frozenset(
        leaf.key for leaf in iter_leaves(model) if holds_mapping(leaf.field.annotation)
    )


def types_at(annotation: Any, parts: Sequence[str]) -> list[Any]:
    """The types the value at ``parts`` below a value of this type may have: a model's
    field's (any, if it allows extra fields), a mapping's values', each arm's of a union
    (``[Any]`` where that is not known, as for ``Any``). None where no arm holds such a
    key: below a number or a text (``weights.a.b`` of a ``dict[str, float]``, as
    ``train.lr.x``), or a model without such a field (a typo, ``opt.tokn``, that the
    model would drop without a word): then it is no key of the schema."""
    if not parts:
        return [annotation]
    if annotation is Any or annotation is object:
        return [Any]
    origin = get_origin(annotation)
    if origin is Annotated:
        return types_at(get_args(annotation)[0], parts)
    if origin is Union or origin is UnionType:
        return [t for arg in get_args(annotation) for t in types_at(arg, parts)]
    kind = origin if origin is not None else annotation
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        if getattr(kind, "__pydantic_root_model__", False):
            return types_at(kind.model_fields["root"].annotation, parts)
        field = kind.model_fields.get(parts[0])
        if field is None:
            return [Any] if kind.model_config.get("extra") == "allow" else []
        return types_at(field.annotation, parts[1:])
    if isinstance(kind, type) and issubclass(kind, Mapping):
        args = get_args(annotation)
        return types_at(args[1], parts[1:]) if len(args) == 2 else [Any]
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):  # as a model, no extras
        inputs = _dataclass_inputs(kind)
        return types_at(inputs[parts[0]], parts[1:]) if parts[0] in inputs else []
    if isinstance(kind, type):
        return []  # a number, a text: it holds no key
    return [Any]  # a type variable, a forward reference: validation decides


def leaf_map(model: type[BaseModel]) -> dict[str, Leaf]:
    return {leaf.key: leaf for leaf in iter_leaves(model)}


def restart_only_keys(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(leaf.key for leaf in iter_leaves(model) if not leaf.live)


def restart_only_written(keys: Iterable[str], restart_only: Iterable[str]) -> set[str]:
    """Of the ``restart_only`` keys, those that the dotted ``keys`` write: such a key
    itself, or one inside it (``weights.head`` of a restart-only mapping ``weights``),
    which changes it all the same."""
    written = list(keys)
    return {
        key for key in restart_only if any(w == key or w.startswith(f"{key}.") for w in written)
    }


def load_schema(spec: str) -> type[BaseModel]:
    """Import ``module:Class`` and check it is a pydantic model class."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SchemaLoadError(f"schema {spec!r} must look like 'package.module:ClassName'")
    # Like ``python -m``, look in the working directory too, so a console script run
    # from a repository root (a git hook, CI) finds the schema that lives there.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise SchemaLoadError(f"cannot import schema module {module_name!r}: {exc}") from exc
    except SystemExit as exc:
        # A script's top-level code (``sys.exit()``, argparse reading hotknob's own
        # arguments) ran: left to itself it ends the command with the script's exit code,
        # 0 too, and ``validate`` in a git hook would pass without checking anything.
        raise SchemaLoadError(
            f"cannot import schema module {module_name!r}: it called sys.exit({exc.code!r}) "
            "at import (does it run a script's code? keep the schema in a module of its own)"
        ) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise SchemaLoadError(f"module {module_name!r} has no {attr!r}") from None
    if not (isinstance(target, type) and issubclass(target, BaseModel)):
        raise SchemaLoadError(f"schema {spec!r} is not a pydantic model class")
    return target
