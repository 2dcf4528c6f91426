"""What a merge says about a value it refused: the key and the layer to blame, in words
that quote no secret.

A schema's own validators write their messages, and pydantic hands them the input, secrets
and all: a message about a secret key is withheld, and a message about any other key has
every secret value it quotes masked (``reason``, ``secret_texts``); the input of a section
or of the whole model that a validator refused is shown with its secret leaves masked
(``masked_input``). A clash of a key below a mapping leaf with that leaf's value names both
sides, each with its layer (``clash``). A valid value that pydantic cannot turn into JSON
is named with its layer (``unsendable``); an exception the schema's own code raised
instead of a validation error, by ``raised.raised_by_schema``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_args

from pydantic import BaseModel, TypeAdapter
from pydantic_core.core_schema import ErrorType

from .errors import Problem
from .keys import KeyClash
from .raised import SCHEMA_FAULTS, schema_code
from .schema import iter_leaves
from .secrecy import SECRET_MASK, SECRET_TYPES, hides, shown_value

_CUSTOM_ERROR_TYPES = frozenset({"value_error", "assertion_error"})
"""The error types of a schema's own validators (a ``ValueError`` or an ``assert``): their
message is whatever the validator wrote, and it may quote the value. So may that of a
``PydanticCustomError``, whose type is the validator's own: any type pydantic does not
define counts too."""

_PYDANTIC_ERROR_TYPES = frozenset(get_args(ErrorType))


def is_custom(error_type: str) -> bool:
    """Whether an error's message is one that a validator of the schema wrote."""
    return error_type in _CUSTOM_ERROR_TYPES or error_type not in _PYDANTIC_ERROR_TYPES


def reason_for(
    error_type: str,
    message: str,
    secrets: frozenset[str],
    key: str,
    leaf: str,
    quoted: Sequence[str] = (),
) -> str:
    """The reason a Problem gives for a pydantic error. For a secret key, a message that a
    schema's validator wrote is withheld, since it may quote the secret; pydantic's own
    messages do not quote the input, but may tell of it (its length): for a secret key
    ``model_check`` says them through ``secrecy.refusal_shown`` instead. A
    validator's message about any other key (a rule across fields, a section's or the
    whole model's validator) may quote a secret too: each of ``quoted``
    (``secret_texts``) in it is masked."""
    custom = is_custom(error_type)
    if custom and (key in secrets or leaf in secrets):
        return (
            "refused by a validator of the schema (its message is withheld for a secret "
            f"key; error type {error_type})"
        )
    if custom:
        for text in quoted:  # longest first: a secret inside another is masked with it
            message = message.replace(text, SECRET_MASK)
    return message


def secret_texts(
    schema: type[BaseModel], merged: Mapping[str, Any], secrets: frozenset[str]
) -> list[str]:
    """The secret values a validator's message may quote, longest first: those of the keys
    of ``merged`` that are not shown (``hides``), and the defaults of the schema's secret
    keys (a validator may quote one that no layer set). Each string, and for another value
    its ``str()``, also as validated (stripped, in lower and in upper case, as pydantic's
    string options leave it), and each of those as ``repr`` and JSON write it within
    quotes (escaped) and as ``repr`` shows its UTF-8 bytes. None is no secret; an empty text
    is never masked. A secret quoted in part (a prefix) cannot be found."""
    found: set[str] = set()
    stack: list[Any] = [v for k, v in merged.items() if hides(k, secrets)]
    for leaf in iter_leaves(schema):
        if leaf.key in secrets and not leaf.field.is_required():
            try:
                stack.append(schema_code(leaf.field.get_default, call_default_factory=True))
            except SCHEMA_FAULTS:  # a factory that fails, or needs the other fields: none to mask
                continue
    while stack:
        node = stack.pop()
        if isinstance(node, SECRET_TYPES):
            node = node.get_secret_value()
        if isinstance(node, bytes):
            node = node.decode("utf-8", "replace")
        if node is None:
            continue
        if isinstance(node, BaseModel):  # a leaf's model that holds secrets
            stack.extend(getattr(node, name) for name in type(node).model_fields)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            stack.extend(getattr(node, field.name, None) for field in dataclasses.fields(node))
        elif isinstance(node, Mapping):
            stack.extend(node.values())
        elif isinstance(node, list | tuple | set | frozenset):
            stack.extend(node)
        else:
            text = node if isinstance(node, str) else str(node)
            # As validated, too: pydantic's own string options strip it and change its case.
            for form in {text, text.strip()}:
                for cased in (form, form.lower(), form.upper()):
                    found.update(
                        (
                            cased,
                            repr(cased)[1:-1],
                            json.dumps(cased)[1:-1],
                            cased.replace("'", "\\'"),  # ``repr`` of text with both quotes
                            repr(cased.encode("utf-8", "replace"))[2:-1],  # as bytes
                        )
                    )
    found.discard("")
    return sorted(found, key=len, reverse=True)


def masked_input(
    key: str, value: Any, is_known: Callable[[str], bool], secrets: frozenset[str]
) -> Any:
    """The input of a section (or of the whole model, ``key`` "") that a validator refused,
    as a problem may carry it: each leaf's value as ``shown_value`` shows it, secrets
    masked. A value that is neither a leaf's nor a section's mapping (an unknown key, a
    model instance) is shown only where ``hides`` allows."""
    if not is_known(key) and isinstance(value, Mapping):
        return {
            name: masked_input(f"{key}.{name}" if key else str(name), item, is_known, secrets)
            for name, item in value.items()
        }
    return shown_value(key, value, secrets)


def clash(exc: KeyClash, merged: Mapping[str, Any], winners: Mapping[str, str]) -> list[Problem]:
    """Both keys of a clash, each with its own layer, so that a live layer's key can be
    dropped whichever of the two it is. A side that lies inside a mapping leaf's value
    (``model.w.head`` of ``model.w: {"head": 1}``) is named by that leaf."""

    def owner(key: str) -> str:
        if key in winners:
            return key
        return next((k for k in winners if key.startswith(k + ".")), key)

    one, other = owner(exc.key), owner(exc.other)
    return [
        Problem(
            a,
            winners.get(a, "defaults"),
            f"conflicts with {b} (from {winners.get(b)})",
            merged.get(a),
        )
        for a, b in ((one, other), (other, one))
    ]


_ANY: TypeAdapter[Any] = TypeAdapter(Any)
UNSENDABLE = (
    "cannot be sent to clients: pydantic cannot turn it into JSON "
    "(nested more deeply than its serializer goes, about 250 levels?)"
)
_NOT_UTF8 = "cannot be sent to clients: bytes that are not UTF-8 text have no JSON form"


def unsendable(merged: Mapping[str, Any], winners: Mapping[str, str]) -> list[Problem]:
    """A problem for each value given that pydantic cannot dump to JSON (none if each can:
    then the schema's own code made what cannot be dumped, ``raised.raised_by_schema``).
    The value itself is left out: a log line or an event carrying it could fail the same
    way."""
    problems = []
    for key, value in merged.items():
        try:
            _ANY.dump_python(value, mode="json")
        except UnicodeDecodeError:  # bytes (YAML's ``!!binary``) that are no UTF-8 text
            problems.append(Problem(key, winners.get(key, "defaults"), _NOT_UTF8))
        except ValueError:
            problems.append(Problem(key, winners.get(key, "defaults"), UNSENDABLE))
    return problems
