"""Which schema types pydantic's lax validation reads ``true``/``false`` as a number.

In lax mode pydantic takes ``true`` for 1 and ``false`` for 0 wherever a number is due,
so a typo (``lr: true``) would pass as a learning rate of 1.0. The merge refuses such a
value (``merge.booleans_for_numbers``); what it needs to know for that is how each type
reads a boolean: a number-only type, a ``Literal`` or ``Enum`` with 1 or 0, a union of
such, or a container, mapping or model holding them. That reading of types is this
module's job, apart from what a schema is and which of its keys are leaves
(``schema``), and from what the merge does with a value it finds (``merge``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from enum import Enum
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Secret

from .schema import iter_leaves


def is_number_only(annotation: Any) -> bool:
    """Whether a value of this type is a number and nothing else (``float``, ``int``,
    ``PositiveFloat``, ``float | None``, ``Literal[1, 2]``, an ``Enum`` of numbers, a
    ``Secret[int]``). pydantic's lax mode reads ``true`` as 1 for it: the merge refuses
    that first."""
    origin = get_origin(annotation)
    if origin is Annotated or origin is Secret:
        return is_number_only(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return bool(args) and all(is_number_only(arg) for arg in args)
    if origin is Literal:
        return all(_a_number(arg) for arg in get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return all(_a_number(member.value) for member in annotation)
    return (
        isinstance(annotation, type)
        and issubclass(annotation, int | float)
        and not issubclass(annotation, bool)
    )


def _a_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal`` or an ``Enum`` allows; None for any other type."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return tuple(member.value for member in annotation)
    return None


_NO_BOOL_ARMS = (str, bytes, type(None), list, tuple, dict, AbstractSet, Mapping, Sequence)
"""Types whose lax validation refuses ``true``/``false`` outright: as an arm of a union
beside a number, they leave the number to read it."""


def reads_bool_as_number(annotation: Any) -> bool:
    """Whether pydantic's lax validation makes ``true``/``false`` the number 1 or 0 here,
    rather than keeping a boolean or refusing it: a number-only type (``is_number_only``);
    a ``Literal`` or ``Enum`` with a member 1 or 0 and no boolean one (``Literal["fast",
    1]``: ``true`` matches 1); a union whose arms keep no boolean as one and one of which
    reads it as a number (``float | str``: 1.0). Not where an arm may take a boolean
    (``bool``, ``Any``, a type this does not know)."""
    origin = get_origin(annotation)
    if origin is Annotated or origin is Secret:
        return reads_bool_as_number(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        arms = [arg for arg in get_args(annotation) if arg is not type(None)]
        reading = [arm for arm in arms if reads_bool_as_number(arm)]
        return bool(reading) and all(arm in reading or _takes_no_bool(arm) for arm in arms)
    if is_number_only(annotation):
        return True
    choices = _choices(annotation)
    if choices is None or any(type(c) is bool for c in choices):
        return False
    return any(_a_number(c) and c in (0, 1) for c in choices)


def _takes_no_bool(annotation: Any) -> bool:
    """Whether lax validation refuses ``true``/``false`` for this type outright (a text, a
    container, a model, a ``Literal`` or ``Enum`` of texts)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _takes_no_bool(get_args(annotation)[0])
    choices = _choices(annotation)
    if choices is not None:
        return not any(c in (0, 1) for c in choices)  # ``True == 1``: it would match
    kind = origin if origin is not None else annotation
    if not isinstance(kind, type):
        return False
    return issubclass(kind, BaseModel) or (
        issubclass(kind, _NO_BOOL_ARMS) and not issubclass(kind, bool)
    )


def holds_bool_for_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` is or holds ``true``/``false`` where ``annotation`` would read it
    as a number (``reads_bool_as_number``): the leaf itself, or an item of a list, tuple
    or set, a value of a mapping, a field of a model (``[true, false]`` for a
    ``tuple[float, ...]``), where every type a union allows would take it for a number."""
    if type(value) is bool:
        return reads_bool_as_number(annotation)
    origin = get_origin(annotation)
    if origin is Annotated:
        return holds_bool_for_number(get_args(annotation)[0], value)
    if origin is Union or origin is UnionType:
        arms = [arg for arg in get_args(annotation) if arg is not type(None)]
        return bool(arms) and all(holds_bool_for_number(arm, value) for arm in arms)
    kind = origin if origin is not None else annotation
    if isinstance(value, Mapping) and isinstance(kind, type) and issubclass(kind, BaseModel):
        return _model_holds_bool_for_number(kind, value)
    args = get_args(annotation)
    if not isinstance(kind, type) or not args:
        return False
    if isinstance(value, list) and issubclass(kind, tuple) and args[-1] is not Ellipsis:
        return any(holds_bool_for_number(a, v) for a, v in zip(args, value, strict=False))
    if isinstance(value, list) and issubclass(kind, list | tuple | AbstractSet):
        return any(holds_bool_for_number(args[0], item) for item in value)
    if isinstance(value, Mapping) and issubclass(kind, Mapping) and len(args) == 2:
        return any(holds_bool_for_number(args[1], item) for item in value.values())
    return False


def _model_holds_bool_for_number(model: type[BaseModel], value: Mapping[str, Any]) -> bool:
    fields = model.model_fields
    return any(
        holds_bool_for_number(fields[name].annotation, item)
        for name, item in value.items()
        if name in fields
    )


def _mentions_numbers(annotation: Any, seen: frozenset[type] = frozenset()) -> bool:
    """Whether a number-only type is part of this type anywhere (``list[float]``, a model
    with an ``int`` field): a leaf of such a type is checked for ``true``/``false``."""
    if reads_bool_as_number(annotation):
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation in seen:
            return False
        inside = seen | {annotation}
        return any(
            _mentions_numbers(f.annotation, inside) for f in annotation.model_fields.values()
        )
    return any(_mentions_numbers(arg, seen) for arg in get_args(annotation))


def numeric_keys(model: type[BaseModel]) -> dict[str, Any]:
    """The leaves of ``model`` that take numbers only, or hold such (a ``list[float]``, a
    ``dict[str, int]``), and their types (see ``holds_bool_for_number``)."""
    return {
        leaf.key: leaf.field.annotation
        for leaf in iter_leaves(model)
        if _mentions_numbers(leaf.field.annotation)
    }
