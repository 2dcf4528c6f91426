"""Validating a live change leaf by leaf, where the schema lets that give what a whole
validation gives.

A lone etcd put changes one leaf. Validating the whole model for it (and dumping the
whole model, and diffing every key) is most of the daemon's work on that change, and
on CPUs just back from idle it costs ~170 µs where validating the one value costs ~45
(docs/performance-history.md, tenth round). The two agree only if nothing but the leaf's own
type looks at the value: no validator or serializer of a model on its path (they may
read other fields, or be changed by this one), no post-init, no core schema,
validation, dump or copy a model overrides, no cached property, no default factory
that takes the other fields' values, no alias or exclusion on the leaf, a type whose
core schema calls no function of the user's, and no rule against the clock anywhere in
the schema (a whole validation re-checks every value).
``leaf_check`` decides that once per key; ``validate_puts`` uses it, and declines
(``None``) a change with any key that fails it, which the whole validation then takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from .keys import by_first_part, nested_with
from .raised import SCHEMA_FAULTS
from .schema import iter_leaves
from .secrecy import secret_keys
from .sendable import holds_sets, non_finite, sort_sets

# Core schema types that validate and dump a value by themselves: no function of the
# user's, no model or dataclass (with validators of their own), no reference.
_PLAIN = frozenset(
    {
        "any",
        "none",
        "bool",
        "int",
        "float",
        "decimal",
        "str",
        "bytes",
        "date",
        "time",
        "datetime",
        "timedelta",
        "uuid",
        "literal",
        "enum",
        "nullable",
        "union",
        "list",
        "tuple",
        "set",
        "frozenset",
        "dict",
    }
)
_NOT_SCHEMAS = frozenset({"metadata", "cls", "members", "expected", "sub_type"})


def _plain(node: Any) -> bool:
    """Whether every schema in the core schema ``node`` is one of ``_PLAIN``, none has a
    serializer of its own, and none names a function."""
    if isinstance(node, list | tuple):
        return all(_plain(item) for item in node)
    if not isinstance(node, dict):
        return not callable(node) or isinstance(node, type)
    if "type" in node and (node["type"] not in _PLAIN or "serialization" in node):
        return False
    return all(_plain(value) for key, value in node.items() if key not in _NOT_SCHEMAS)


def _reads_the_clock(node: Any) -> bool:
    """Whether the core schema ``node`` holds a constraint against the current time
    (``FutureDatetime``, ``PastDate``): a value valid when put may be refused later, by a
    whole validation of any change, which validating another value alone would miss."""
    if isinstance(node, dict):
        return "now_op" in node or any(_reads_the_clock(value) for value in node.values())
    if isinstance(node, list | tuple):
        return any(_reads_the_clock(item) for item in node)
    return False


_DECORATOR_KINDS = (
    "validators",
    "field_validators",
    "root_validators",
    "field_serializers",
    "model_serializers",
    "model_validators",
    "computed_fields",
)


# What a whole validation calls on the schema (and ``model_with`` on each model): a class
# that overrides one may change what it gives.
_BASE_METHODS = ("__get_pydantic_core_schema__", "model_validate", "model_dump", "model_copy")


def _same_function(cls: type, name: str) -> bool:
    def function(owner: type) -> Any:
        attribute = getattr(owner, name)
        return getattr(attribute, "__func__", attribute)

    return function(cls) is function(BaseModel)


def _plain_model(cls: type[BaseModel]) -> bool:
    """Whether validating ``cls`` is validating each of its fields alone: no validator,
    serializer or computed field, no post-init, no ``__init__``, core schema, validation,
    dump or copy of its own, no cached property (a copy would keep a stale one), and no
    default factory that takes the other fields' values."""
    decorators = cls.__pydantic_decorators__
    return (
        not any(getattr(decorators, kind) for kind in _DECORATOR_KINDS)
        and getattr(cls, "__pydantic_post_init__", None) is None
        and not getattr(cls, "__pydantic_custom_init__", False)
        and not getattr(cls, "__pydantic_root_model__", False)
        and cls.__copy__ is BaseModel.__copy__
        and all(_same_function(cls, name) for name in _BASE_METHODS)
        and not any(  # a default made from the other fields would follow them
            getattr(field, "default_factory_takes_validated_data", False)
            for field in cls.model_fields.values()
        )
        and not any(
            isinstance(attribute, cached_property)
            for owner in cls.__mro__
            for attribute in vars(owner).values()
        )
    )


def _plain_field(field: FieldInfo) -> bool:
    return (
        field.alias is None
        and field.serialization_alias is None
        and field.validation_alias is None
        and not field.exclude
        and getattr(field, "exclude_if", None) is None  # pydantic 2.11 and later
        and field.discriminator is None
    )


@dataclass(frozen=True)
class LeafCheck:
    """How one leaf's value is validated and dumped alone: its type, with the constraints
    and the config its model gives it."""

    path: tuple[str, ...]
    adapter: TypeAdapter[Any]
    order: int  # the leaf's place in the schema: ``changed`` lists keys in that order
    sets: bool = False  # its value may hold a set: ``sort_sets`` orders its dump


@lru_cache(maxsize=64)
def _leaf_order(schema: type[BaseModel]) -> dict[str, int] | None:
    """Each leaf's place in ``schema``; None if no key of it may be validated alone."""
    try:
        if _reads_the_clock(schema.__pydantic_core_schema__):
            return None
    except AttributeError:  # a schema not built yet: the whole path builds it
        return None
    return {leaf.key: place for place, leaf in enumerate(iter_leaves(schema))}


@lru_cache(maxsize=1024)
def leaf_check(schema: type[BaseModel], key: str) -> LeafCheck | None:
    """The ``LeafCheck`` of the leaf ``key`` of ``schema``; None if validating it alone
    could differ from validating the model (see the module's docstring), or ``key``
    is no plain leaf of it."""
    try:
        return _leaf_check(schema, key)
    except Exception:  # a schema shape this module does not know: the whole path takes it
        return None


def _leaf_check(schema: type[BaseModel], key: str) -> LeafCheck | None:
    order = _leaf_order(schema)
    if order is None or key not in order:
        return None
    if key in secret_keys(schema):
        return None  # the clients get its revealed value: the whole path does that
    path = tuple(key.split("."))
    model: Any = schema
    for part in path[:-1]:
        field = model.model_fields.get(part)
        if field is None or not _plain_model(model) or not _plain_field(field) or field.metadata:
            return None
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    field = model.model_fields.get(path[-1])
    if field is None or not _plain_model(model) or not _plain_field(field):
        return None
    annotation: Any = (
        Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    )
    adapter: TypeAdapter[Any] = TypeAdapter(annotation, config=model.model_config)
    if not _plain(adapter.core_schema):
        return None
    return LeafCheck(path, adapter, order[key], holds_sets(field.annotation))


@dataclass(frozen=True)
class LeafChanges:
    """What ``validate_puts`` makes of a change: the validated values by path (for
    ``model_with``), and the values in force, nested and by dotted key, in JSON form,
    with the keys whose value changed."""

    validated: dict[tuple[str, ...], Any]
    values: dict[str, Any]
    flat: dict[str, Any]
    changed: dict[str, Any]


def validate_puts(
    schema: type[BaseModel],
    values: Mapping[str, Any],
    flat: Mapping[str, Any],
    puts: Mapping[str, Any],
) -> LeafChanges | None:
    """The state after ``puts`` (leaves of ``schema`` to raw values) on the state in force
    (``values``, a validated model's JSON dump, and ``flat``, the same by dotted key),
    each leaf validated alone: what ``validate_leaves`` and ``changed_keys`` give. None if
    a key of ``puts`` cannot be validated alone, or a value valid for it cannot be
    dumped (nested deeper than pydantic serializes): the whole path says why. Raises
    ``ValidationError``, as a whole validation would, before anything is dumped. Nothing
    given is edited: the sections on the puts' paths are copied."""
    checks: list[tuple[str, LeafCheck]] = []
    for key in puts:
        check = leaf_check(schema, key)
        if check is None:
            return None
        checks.append((key, check))
    if len(checks) > 1:
        checks.sort(key=lambda item: item[1].order)
    validated = {check.path: check.adapter.validate_python(puts[key]) for key, check in checks}
    if non_finite(puts):  # valid: a type of ``Any`` would dump it as null; the whole path
        return None  # refuses it as given
    dumped: dict[tuple[str, ...], Any] = {}
    new_flat = dict(flat)
    changed: dict[str, Any] = {}
    for key, check in checks:
        try:
            new = check.adapter.dump_python(validated[check.path], mode="json")
        except ValueError:  # pydantic's serialization errors are ValueErrors
            return None
        if check.sets:
            sort_sets(validated[check.path], new)  # as the whole path sends it
        dumped[check.path] = new_flat[key] = new
        old = flat.get(key, changed)  # a key not there before is a change
        if type(old) is not type(new) or old != new:
            changed[key] = new
    return LeafChanges(validated, nested_with(values, dumped), new_flat, changed)


def model_with(model: BaseModel, validated: Mapping[tuple[str, ...], Any]) -> BaseModel:
    """A copy of ``model`` with the values ``validate_puts`` validated (by path), the
    sections on their paths copied the same way; not validated again."""
    here, below = by_first_part(validated)
    for name, inner in below.items():
        here[name] = model_with(getattr(model, name), inner)
    return model.model_copy(update=here)


_PLAIN_JSON = frozenset({str, int, float, bool, type(None)})
_NOTHING: Any = object()


def validate_plain_put(
    check: LeafCheck,
    key: str,
    value: Any,
    values: Mapping[str, Any],
    flat: Mapping[str, Any],
) -> LeafChanges | None:
    """``validate_puts`` of ``{key: value}`` for a plain value (a number, a text, a boolean,
    null) that ``check`` dumps to one: the same state, without the loops and records that
    serve many puts (docs/performance-history.md, thirteenth round: the commonest live change).
    None where that is not so (another kind of value or dump), and where the value is
    invalid, changes nothing, or the type's code raised: ``validate_puts`` or the whole
    path then decides, and says why."""
    if type(value) not in _PLAIN_JSON or (type(value) is float and value - value != 0.0):
        return None  # not finite: a type that dumps it as null must not take it
    try:
        validated = check.adapter.validate_python(value)
        new = check.adapter.dump_python(validated, mode="json")
    except SCHEMA_FAULTS:
        return None
    old = flat.get(key, _NOTHING)
    if type(new) not in _PLAIN_JSON or (type(old) is type(new) and old == new):
        return None
    new_flat = dict(flat)
    new_flat[key] = new
    path = check.path
    return LeafChanges({path: validated}, nested_with(values, {path: new}), new_flat, {key: new})
