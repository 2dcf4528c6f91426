"""Secret keys: which leaves of a schema hold secrets, and how values are shown or logged.

A leaf typed ``SecretStr``, ``SecretBytes`` or pydantic's ``Secret[T]`` (or holding one:
``Optional[Creds]``, ``dict[str, SecretStr]``, a dataclass or a TypedDict with a secret
field) is a secret: clients get its value (``revealed``), but
everything that shows or logs values (``set``, ``get``, ``history``, the daemon's log,
``watch``) shows ``SECRET_MASK`` instead (``hides``, ``shown_value``, ``mask_secrets``).
For a schema with any secret, a value under a key that is no leaf of it is hidden too
(``SecretKeys``). Why a secret's value was refused is said without what pydantic's message
tells of the value itself, such as its length (``refusal_shown``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, get_args, get_origin

from pydantic import BaseModel, Secret, SecretBytes, SecretStr, TypeAdapter
from pydantic_core import PydanticKnownError, to_jsonable_python

from .schema import computed_fields, field_types, holds_mapping, iter_leaves

SECRET_MASK = "**********"

SECRET_TYPES = (SecretStr, SecretBytes, Secret)
"""The types whose values pydantic masks: ``Secret[int]``'s values are ``Secret``s."""


def _is_secret(annotation: Any, seen: frozenset[type] = frozenset()) -> bool:
    """Whether a value of this type is or holds a secret: ``SecretStr``, ``SecretBytes``,
    ``Secret[T]``, a model, a dataclass or a TypedDict with one among its fields, or a
    container or union of such (a leaf typed ``Optional[Creds]``, ``dict[str, SecretStr]``
    or a dataclass that holds a ``SecretStr`` is secret as a whole)."""
    if get_origin(annotation) is Secret:
        return True
    if isinstance(annotation, type):
        if issubclass(annotation, SECRET_TYPES):
            return True
        fields = field_types(annotation) if annotation not in seen else None
        if fields is not None:
            inside = seen | {annotation}
            return any(_is_secret(field, inside) for field in fields)
    return any(_is_secret(arg, seen) for arg in get_args(annotation))


_AS_PYTHON: TypeAdapter[Any] = TypeAdapter(Any)


def revealed(value: Any) -> Any:
    """``value`` in JSON form (as ``to_jsonable_python`` makes it) with each secret in it,
    however deep, as its value rather than pydantic's ``**********``: what clients get.

    It is dumped in Python mode first, as pydantic dumps it (a model, a dataclass: their
    fields as a dict, each serializer and exclusion of theirs applied), which keeps each
    secret an object whose value can be read."""
    return to_jsonable_python(_unmasked(_AS_PYTHON.dump_python(value, by_alias=False)))


def _unmasked(value: Any) -> Any:
    if isinstance(value, SECRET_TYPES):
        secret = value.get_secret_value()
        return secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret
    if isinstance(value, Mapping):
        return {key: _unmasked(item) for key, item in value.items()}
    if isinstance(value, list | tuple | AbstractSet):
        return [_unmasked(item) for item in value]
    return value


class SecretKeys(frozenset[str]):
    """The secret leaves of a schema, which also know the schema's other leaves and which
    of them hold a mapping.

    A value under a key that is not a leaf (a section key holding a JSON object, a
    mistyped key) may well be a secret meant for a leaf nearby: when the schema has any
    secret, such a value is never shown either (``hides``). A key under a leaf that holds
    a mapping (``weights.head`` of ``weights: dict[str, float]``) is part of that leaf's
    value, so it is shown or hidden as that leaf is. A plain frozenset of keys masks those
    keys, and the keys under them, only.

    The schema's facts go with the keys wherever the set goes: a copy, a pickle, and the
    result of a set operation with another set (``|``, ``&``, ``-``, ``^`` and their
    named forms) are ``SecretKeys`` too. Had they fallen back to a plain frozenset, a
    mistyped key's value would silently be shown. (``set | SecretKeys`` is the one form
    that cannot keep them: a mutable set on the left builds its own result.)
    """

    __slots__ = ("leaves", "mappings")
    leaves: frozenset[str]
    mappings: frozenset[str]

    def __new__(
        cls, secrets: Iterable[str], leaves: Iterable[str], mappings: Iterable[str] = ()
    ) -> SecretKeys:
        made = super().__new__(cls, secrets)
        object.__setattr__(made, "leaves", frozenset(leaves))
        object.__setattr__(made, "mappings", frozenset(mappings))
        return made

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"SecretKeys is immutable: cannot set {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (frozenset(self), self.leaves, self.mappings))

    def shows(self, key: str) -> bool:
        """Whether the value of ``key`` may be shown, by this schema's rule (``hides``)."""
        if key in self:
            return False
        if key in self.leaves or not self:
            return True
        owner = _owner(key, self.mappings)
        return owner is not None and owner not in self

    def _like(self, keys: Iterable[str], other: object = None) -> SecretKeys:
        """``keys`` with this set's facts; with those of ``other`` too if it has them, a
        key then being shown only where both would show it. ``NotImplemented`` (an
        operand that is no set) is passed on, so that Python raises its usual error."""
        if keys is NotImplemented:
            return NotImplemented
        if isinstance(other, SecretKeys):
            return SecretKeys(keys, self.leaves & other.leaves, self.mappings & other.mappings)
        return SecretKeys(keys, self.leaves, self.mappings)

    def copy(self) -> SecretKeys:
        return self

    def __or__(self, other: AbstractSet[Any]) -> SecretKeys:
        return self._like(frozenset.__or__(self, other), other)

    def __and__(self, other: AbstractSet[Any]) -> SecretKeys:
        return self._like(frozenset.__and__(self, other), other)

    def __sub__(self, other: AbstractSet[Any]) -> SecretKeys:
        return self._like(frozenset.__sub__(self, other), other)

    def __xor__(self, other: AbstractSet[Any]) -> SecretKeys:
        return self._like(frozenset.__xor__(self, other), other)

    def __ror__(self, other: AbstractSet[Any]) -> SecretKeys:
        return self._like(frozenset.__or__(frozenset(self), other), other)

    def __rand__(self, other: AbstractSet[Any]) -> SecretKeys:
        return self._like(frozenset.__and__(frozenset(self), other), other)

    def __rsub__(self, other: AbstractSet[Any]) -> SecretKeys:
        if not isinstance(other, AbstractSet):
            return NotImplemented
        return self._like(frozenset(other) - frozenset(self), other)

    def __rxor__(self, other: AbstractSet[Any]) -> SecretKeys:
        return self._like(frozenset.__xor__(frozenset(self), other), other)

    def union(self, *others: Iterable[Any]) -> SecretKeys:
        return self._like(frozenset.union(self, *others), _facts_of(others))

    def intersection(self, *others: Iterable[Any]) -> SecretKeys:
        return self._like(frozenset.intersection(self, *others), _facts_of(others))

    def difference(self, *others: Iterable[Any]) -> SecretKeys:
        return self._like(frozenset.difference(self, *others), _facts_of(others))

    def symmetric_difference(self, other: Iterable[Any]) -> SecretKeys:
        return self._like(frozenset.symmetric_difference(self, other), other)


def _facts_of(others: tuple[Iterable[Any], ...]) -> SecretKeys | None:
    """The one ``SecretKeys`` among ``others`` whose facts a named set operation combines
    (several: their facts combined, as ``_like`` does)."""
    found: SecretKeys | None = None
    for other in others:
        if isinstance(other, SecretKeys):
            found = other if found is None else found._like(found, other)
    return found


def _owner(key: str, leaves: AbstractSet[str]) -> str | None:
    """The key of ``leaves`` that ``key`` lies under (``weights`` for ``weights.head``)."""
    parts = key.split(".")
    return next(
        (owner for i in range(1, len(parts)) if (owner := ".".join(parts[:i])) in leaves), None
    )


def secret_keys(model: type[BaseModel]) -> SecretKeys:
    """Leaves that are or hold secrets (``_is_secret``): never shown or logged. For a schema
    with secrets, its computed fields too: one may well be made from a secret (a URL with
    a password in it)."""
    leaves = list(iter_leaves(model))
    secrets = [leaf.key for leaf in leaves if _is_secret(leaf.field.annotation)]
    computed = dict(computed_fields(model))
    if secrets or any(_is_secret(kind) for kind in computed.values()):
        secrets.extend(computed)
    return SecretKeys(
        secrets,
        (leaf.key for leaf in leaves),
        (leaf.key for leaf in leaves if holds_mapping(leaf.field.annotation)),
    )


def hides(key: str, secrets: frozenset[str]) -> bool:
    """Whether the value of ``key`` must not be shown: a secret key or a key under one; for
    a schema with secrets (``SecretKeys``), also any key that is neither a leaf of it nor
    under a leaf that holds a mapping (``SecretKeys.shows``)."""
    if not secrets:
        return False
    if isinstance(secrets, SecretKeys):
        return not secrets.shows(key)
    return key in secrets or _owner(key, secrets) is not None


def shown_value(key: str, value: Any, secrets: frozenset[str]) -> Any:
    """``value`` as it may be shown to people or logged: the mask if ``key`` ``hides`` it
    (None stays None: that a key is unset is no secret)."""
    return SECRET_MASK if value is not None and hides(key, secrets) else value


def mask_secrets(values: Mapping[str, Any], secrets: frozenset[str]) -> dict[str, Any]:
    """``values`` (flat dotted keys) with each hidden key's value (``hides``) masked."""
    return {k: shown_value(k, v, secrets) for k, v in values.items()}


_SCHEMA_CONTEXT = frozenset(
    {
        "field_type", "min_length", "max_length", "gt", "ge", "lt", "le", "multiple_of",
        "pattern", "expected", "max_digits", "decimal_places", "whole_digits", "class_name",
        "class", "discriminator", "expected_tags", "expected_schemes", "expected_version",
        "tz_expected", "encoding",
    }
)  # fmt: skip
"""The context entries of pydantic's errors that come from the schema (a bound, a pattern,
an expected type or tag). Any other entry comes from the refused value: its length
(``actual_length``), a parser's account of it (``error``: where a JSON text broke), a tag
or a timezone it holds."""

_WITHHELD = "withheld: secret"


def refusal_shown(error_type: str, message: str, context: Mapping[str, Any] | None) -> str:
    """pydantic's own ``message`` (of ``error_type``, made from ``context``) about a
    refused value of a secret key, as it may be shown: the rule that the value broke
    stays ("at least 12 items": the schema's), what the message tells of the value itself
    ("not 5": its length) is withheld. A validator's own message is no business of this:
    it may quote anything, so it is withheld whole (``blame.reason_for``)."""
    context = context or {}
    if all(name in _SCHEMA_CONTEXT for name in context):
        return message
    if error_type in ("too_short", "too_long"):
        short = error_type == "too_short"
        bound = context.get("min_length" if short else "max_length")
        items = "item" if bound == 1 else "items"
        return (
            f"{context.get('field_type', 'Value')} should have "
            f"{'at least' if short else 'at most'} {bound} {items} after validation "
            f"(too {'short' if short else 'long'}; its length is {_WITHHELD})"
        )
    kept = {name: v if name in _SCHEMA_CONTEXT else f"({_WITHHELD})" for name, v in context.items()}
    try:
        return PydanticKnownError(error_type, kept).message()  # type: ignore[arg-type]
    except Exception:  # a context entry of a type that cannot be a text: say nothing of it
        return f"refused ({error_type}; its message is {_WITHHELD})"
