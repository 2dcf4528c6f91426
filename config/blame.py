"""What a merge says about a value it refused: the key and the layer to blame, in words
that quote no secret.

A schema's own validators write their messages, and pydantic hands them the input, secrets
and all: a message about a secret key is withheld, and a message about any other key has
every secret value it quotes masked (``reason``, ``secret_texts``); the input of a section
or of the whole model that a validator refused is shown with its secret leaves masked
(``masked_input``). A clash of a key below a mapping leaf with that leaf's value names both
sides, each with its layer (``clash``). A valid value that pydantic cannot turn into JSON
is named with its layer (``unsendable``). An exception that the schema's own code raised
instead of a validation error (a before-validator handed a value of another type, a
post-init, a computed field) names no key: the values to blame are found by trying
(``raised_by_schema``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_args

from pydantic import BaseModel, SecretBytes, SecretStr, TypeAdapter
from pydantic_core.core_schema import ErrorType

from .errors import Problem
from .keys import KeyClash
from .schema import SECRET_MASK, hides, iter_leaves, shown_value

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
    messages ("String should have at least 12 characters") never hold the input. A
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
    its ``str()``, also as ``repr`` and JSON write it within quotes (escaped). None is no
    secret; an empty text is never masked."""
    found: set[str] = set()
    stack: list[Any] = [v for k, v in merged.items() if hides(k, secrets)]
    for leaf in iter_leaves(schema):
        if leaf.key in secrets and not leaf.field.is_required():
            try:
                stack.append(leaf.field.get_default(call_default_factory=True))
            except Exception:  # a factory that fails, or needs the other fields: none to mask
                continue
    while stack:
        node = stack.pop()
        if isinstance(node, SecretStr | SecretBytes):
            node = node.get_secret_value()
        if isinstance(node, bytes):
            node = node.decode("utf-8", "replace")
        if node is None:
            continue
        if isinstance(node, Mapping):
            stack.extend(node.values())
        elif isinstance(node, list | tuple | set | frozenset):
            stack.extend(node)
        else:
            text = node if isinstance(node, str) else str(node)
            # As validated, too: pydantic's own string options strip it and change its case.
            for form in {text, text.strip()}:
                for cased in (form, form.lower(), form.upper()):
                    found.update((cased, repr(cased)[1:-1], json.dumps(cased)[1:-1]))
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


def unsendable(merged: Mapping[str, Any], winners: Mapping[str, str]) -> list[Problem]:
    """A problem for each value given that pydantic cannot dump to JSON (none if each can:
    then the schema's own code made what cannot be dumped, ``raised_by_schema``). The
    value itself is left out: a log line or an event carrying it could fail the same way."""
    bad = []
    for key, value in merged.items():
        try:
            _ANY.dump_python(value, mode="json")
        except ValueError:
            bad.append(key)
    return [Problem(key, winners.get(key, "defaults"), UNSENDABLE) for key in bad]


_MESSAGE_CHARS = 300

SCHEMA_FAULTS = (Exception, SystemExit)
"""What a schema's own code may raise, as a merge takes it: anything but a stop that
someone asked for (``KeyboardInterrupt``). A validator's ``sys.exit()`` is its fault too."""

VALID, INVALID, RAISED = "valid", "invalid", "raised"
Outcome = tuple[str, BaseException | None]
"""What a trial merge gave: ``VALID``, ``INVALID`` (a validation error), or ``RAISED``
with the exception of the schema's own code."""

_ONE_BY_ONE_LIMIT = 256


def raised_by_schema(
    exc: BaseException,
    merged: Mapping[str, Any],
    winners: Mapping[str, str],
    defaults: Mapping[str, Any],
    fixed: frozenset[str],
    outcome: Callable[[dict[str, Any]], Outcome],
    secrets: frozenset[str],
    quoted: Sequence[str] = (),
) -> list[Problem]:
    """Problems for ``exc``, raised by the schema's own code while the merge of ``merged``
    was validated or dumped (pydantic turns only a validator's ``ValueError`` or ``assert``
    into a validation error; ``v.strip()`` on a number raises ``AttributeError``).

    Nothing says which key it was, so it is found by trying (``outcome`` of a merge of
    other values). The values a layer gives are set back to their defaults (all but
    ``fixed``: required keys, which have none); if that still raises, the schema itself
    is at fault (the key "", or the required values given). Else the values that raise
    on the defaults alone are blamed, each with what it raised, found by halving the
    given values (a half that merges cleanly is innocent). If none does (it takes two
    together), the values each of which, set back alone, lets the whole merge through;
    failing those too, every value given. The reason is the exception's type and
    message, on one line; the message is withheld for a secret key, and any secret it
    quotes (``quoted``: ``secret_texts``) is masked for the others."""
    given = [key for key in merged if winners.get(key, "defaults") != "defaults"]
    movable = [key for key in given if key not in fixed]
    base = _with_defaults(merged, movable, defaults)
    blamed: dict[str, BaseException]
    if outcome(base)[0] == RAISED:
        blamed = dict.fromkeys([key for key in given if key in fixed] or [""], exc)
    else:
        blamed = _raising_alone(base, movable, merged, outcome)
        if not blamed and len(movable) <= _ONE_BY_ONE_LIMIT:
            blamed = {
                key: exc
                for key in movable
                if outcome(_with_defaults(merged, [key], defaults))[0] == VALID
            }
        blamed = blamed or dict.fromkeys(given or [""], exc)
    return [
        Problem(
            key,
            winners.get(key, "defaults"),
            _raised_reason(raised, hides(key, secrets), quoted),
            merged.get(key),
        )
        for key, raised in blamed.items()
    ]


def _raised_reason(exc: BaseException, secret: bool, quoted: Sequence[str]) -> str:
    said = f"the schema's own code raised {type(exc).__name__}"
    if secret:
        return f"{said} (its message is withheld for a secret key)"
    message = one_line(exc, quoted)
    return f"{said}: {message}" if message else said


def _raising_alone(
    base: dict[str, Any],
    keys: list[str],
    merged: Mapping[str, Any],
    outcome: Callable[[dict[str, Any]], Outcome],
) -> dict[str, BaseException]:
    """The ``keys`` whose value alone on ``base`` makes the merge raise, with what each
    raised. A group that merges cleanly holds none; any other is halved (a validation
    error may hide a raise)."""
    if not keys:
        return {}
    trial = dict(base)
    trial.update((key, merged[key]) for key in keys)
    result, raised = outcome(trial)
    if result == VALID:
        return {}
    if len(keys) == 1:
        return {keys[0]: raised} if raised is not None else {}
    middle = len(keys) // 2
    return {
        **_raising_alone(base, keys[:middle], merged, outcome),
        **_raising_alone(base, keys[middle:], merged, outcome),
    }


def one_line(exc: BaseException, quoted: Sequence[str] = ()) -> str:
    """``exc``'s message on one line, each of ``quoted`` masked, at most ``_MESSAGE_CHARS``."""
    try:
        message = str(exc)
    except Exception:  # an exception whose own ``__str__`` fails: its type says enough
        return ""
    for text in quoted:  # longest first, as ``reason_for`` masks them
        message = message.replace(text, SECRET_MASK)
    message = " ".join(message.split())
    if len(message) > _MESSAGE_CHARS:
        message = message[: _MESSAGE_CHARS - 1] + "…"
    return message


def _with_defaults(
    merged: Mapping[str, Any], keys: Sequence[str], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """``merged`` with ``keys`` at their defaults (left out where there is none: a key
    inside a mapping leaf)."""
    trial = dict(merged)
    for key in keys:
        if key in defaults:
            trial[key] = defaults[key]
        else:
            del trial[key]
    return trial
