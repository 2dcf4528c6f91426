"""Blame for a schema whose own code raised instead of refusing a value.

Pydantic turns only a validator's ``ValueError`` or ``assert`` into a validation error
that names its key. Anything else the schema's code raises (``v.strip()`` on a number in
a before-validator, a computed field or a post-init dividing by zero, a default factory
that fails) comes out as it is, naming no key; what is no ``Exception`` (``SystemExit``,
``KeyboardInterrupt``) comes out of the merge as ``SchemaRaised`` (``as_fault``). The
merge still has to say which value to blame, and a daemon reading etcd anew has to drop
only the values at fault: they are found by trial merges (``raised_by_schema``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from .errors import Problem
from .secrecy import SECRET_MASK, hides

_T = TypeVar("_T")

SCHEMA_FAULTS = (Exception,)
"""What a schema's own code may raise, as a merge takes it. What it raises that is no
``Exception`` comes out of the merge's calls into it as ``SchemaRaised`` (``as_fault``),
so that whatever takes the schema's faults takes those too: no thread dies of one."""


class SchemaRaised(Exception):
    """A ``BaseException`` that is no ``Exception``, raised by the schema's own code (see
    ``as_fault``), as one; ``raised`` is what was raised, which the refusal names."""

    def __init__(self, raised: BaseException) -> None:
        super().__init__(raised)
        self.raised = raised


def as_fault(exc: BaseException) -> BaseException:
    """What a call into the schema's own code raises for ``exc``, a ``BaseException`` that
    is no ``Exception``: ``SchemaRaised``, to be refused like an invalid value, as the
    schema's fault; or ``exc`` itself, passed on, where it is a stop that is no fault:

    - ``GeneratorExit``, which closes a generator: one that took it for a refusal and
      went on would break that protocol (Python reports it as an error);
    - a ``KeyboardInterrupt`` that may be a real Ctrl-C: one on the main thread while
      SIGINT's handler is Python's own (``signal.default_int_handler``, which raises
      it). A command (``hotknob get``, ``set``) stops on it, exit 130, also when it is
      the schema that raised it: the two cannot be told apart.

    Anything else is the schema's: ``SystemExit`` (a validator's ``sys.exit()``), a
    ``BaseException`` class of its own, and a ``KeyboardInterrupt`` off the main thread
    (where no signal is delivered: the daemon's etcd watch thread) or while SIGINT is
    handled otherwise. The daemon handles SIGINT on its loop (``daemon/signals.py``: it
    stops the daemon cleanly), so within it a ``KeyboardInterrupt`` is never a Ctrl-C."""
    if isinstance(exc, GeneratorExit) or (isinstance(exc, KeyboardInterrupt) and _may_be_ctrl_c()):
        return exc
    return SchemaRaised(exc)


def _may_be_ctrl_c() -> bool:
    return (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )


def schema_code(call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``call(*args, **kwargs)``, which runs the schema's own code, with what that raises
    that is no ``Exception`` as ``as_fault`` says."""
    try:
        return call(*args, **kwargs)
    except Exception:
        raise
    except BaseException as exc:
        raise as_fault(exc) from None


def raised_in_schema(exc: BaseException) -> BaseException:
    """What the schema's own code raised, for the exception a merge caught of it."""
    return exc.raised if isinstance(exc, SchemaRaised) else exc


VALID, INVALID, RAISED = "valid", "invalid", "raised"
Outcome = tuple[str, BaseException | None]
"""What a trial merge gave: ``VALID``, ``INVALID`` (a validation error), or ``RAISED``
with the exception of the schema's own code."""

_MESSAGE_CHARS = 300


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

    Nothing says which value it was, so it is found by trial merges (``outcome``), at most
    ``_TRIALS`` of them, of ``merged`` with some of the values a layer gives set back to
    their defaults (``fixed``, required keys, have none and stay):

    - if the same merge does not raise again, the schema's code is not deterministic,
      and the schema (the key "") is blamed;
    - if it raises with every value given set back, the required values given are, or
      else the schema;
    - the values each of which, set back alone, lets the merge through;
    - failing those, the values that raise alone on the defaults (found by halving the
      values given: a half that merges cleanly is innocent), if setting them all back
      ends the raising; each is blamed with what it raised;
    - failing those, the values each of which, set back alone, changes what is raised
      (the first of several faults);
    - failing those, a set of values that, set back together, lets the merge through,
      from which none can be left out (``_needed``); else every value given.

    The reason is the exception's type and message, on one line; the message is
    withheld for a secret key, and any secret it quotes (``quoted``: ``secret_texts``)
    is masked for the others."""
    trials = _Trials(outcome)
    given = [key for key in merged if winners.get(key, "defaults") != "defaults"]
    movable = [key for key in given if key not in fixed]
    result, again = trials.run(dict(merged))
    if result != RAISED or again is None:
        blamed: dict[str, BaseException] = {"": exc}
    else:
        blamed = _blamed(trials, merged, given, movable, defaults, again)
    return [
        Problem(
            key,
            winners.get(key, "defaults"),
            _raised_reason(raised, hides(key, secrets), quoted),
            merged.get(key),
        )
        for key, raised in blamed.items()
    ]


_TRIALS = 256
_ONE_BY_ONE = 64


class _OutOfTrials(Exception):
    pass


class _Trials:
    """Trial merges, at most ``_TRIALS`` for one blame."""

    def __init__(self, outcome: Callable[[dict[str, Any]], Outcome]) -> None:
        self._outcome = outcome
        self.left = _TRIALS

    def run(self, trial: dict[str, Any]) -> Outcome:
        if self.left <= 0:
            raise _OutOfTrials()
        self.left -= 1
        return self._outcome(trial)


def _blamed(
    trials: _Trials,
    merged: Mapping[str, Any],
    given: list[str],
    movable: list[str],
    defaults: Mapping[str, Any],
    exc: BaseException,
) -> dict[str, BaseException]:
    """``raised_by_schema``'s values to blame for ``exc``, each with what it raised."""
    try:
        base = _with_defaults(merged, movable, defaults)  # every value given set back
        result, raised = trials.run(base)
        if result == RAISED and raised is not None:
            return dict.fromkeys([key for key in given if key not in movable] or [""], raised)
        singles: dict[str, Outcome] = {}
        if len(movable) <= _ONE_BY_ONE:
            singles = {key: trials.run(_with_defaults(merged, [key], defaults)) for key in movable}
            cured = [key for key, (result, _) in singles.items() if result == VALID]
        else:
            cured = _cured(trials, merged, movable, defaults)
        if cured:
            return dict.fromkeys(cured, exc)
        alone = _raising_alone(trials, base, movable, merged)
        if alone and trials.run(_with_defaults(merged, list(alone), defaults))[0] != RAISED:
            return alone
        changed = [
            key
            for key, (result, raised) in singles.items()
            if result == RAISED and raised is not None and not _same(raised, exc)
        ]
        if changed:
            return dict.fromkeys(changed, exc)
        needed = _needed(trials, merged, movable, defaults)
        if needed:
            return dict.fromkeys(needed, exc)
    except _OutOfTrials:
        pass
    return dict.fromkeys(given or [""], exc)


def _cured(
    trials: _Trials, merged: Mapping[str, Any], keys: list[str], defaults: Mapping[str, Any]
) -> list[str]:
    """The ``keys`` each of which, set back alone, lets the merge of ``merged`` through,
    found by halving: a group whose values set back together still raise holds none."""
    result, _ = trials.run(_with_defaults(merged, keys, defaults))
    if result == RAISED:
        return []
    if len(keys) == 1:
        return keys if result == VALID else []
    middle = len(keys) // 2
    return _cured(trials, merged, keys[:middle], defaults) + _cured(
        trials, merged, keys[middle:], defaults
    )


def _needed(
    trials: _Trials, merged: Mapping[str, Any], keys: list[str], defaults: Mapping[str, Any]
) -> list[str]:
    """A set of ``keys`` that, set back together, lets the merge through, and from which
    none can be left out: ``keys`` are set back one more at a time until the merge is
    valid, then each is put back in turn, and stays if the merge is still valid (so that
    a value set back on the way, whose default broke a rule, is not blamed)."""
    for end in range(1, len(keys) + 1):
        if trials.run(_with_defaults(merged, keys[:end], defaults))[0] == VALID:
            break
    else:
        return []
    needed = keys[:end]
    for key in list(needed):
        rest = [k for k in needed if k != key]
        if trials.run(_with_defaults(merged, rest, defaults))[0] == VALID:
            needed = rest
    return needed


def _same(one: BaseException, other: BaseException) -> bool:
    return type(one) is type(other) and _text(one) == _text(other)


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # an exception whose own ``__str__`` fails
        return ""


def _raising_alone(
    trials: _Trials,
    base: dict[str, Any],
    keys: list[str],
    merged: Mapping[str, Any],
) -> dict[str, BaseException]:
    """The ``keys`` whose value alone on ``base`` makes the merge raise, with what each
    raised. A group that merges cleanly holds none; any other is halved (a validation
    error may hide a raise)."""
    if not keys:
        return {}
    trial = dict(base)
    trial.update((key, merged[key]) for key in keys)
    result, raised = trials.run(trial)
    if result == VALID:
        return {}
    if len(keys) == 1:
        return {keys[0]: raised} if raised is not None else {}
    middle = len(keys) // 2
    return {
        **_raising_alone(trials, base, keys[:middle], merged),
        **_raising_alone(trials, base, keys[middle:], merged),
    }


def _raised_reason(exc: BaseException, secret: bool, quoted: Sequence[str]) -> str:
    said = f"the schema's own code raised {type(exc).__name__}"
    if secret:
        return f"{said} (its message is withheld for a secret key)"
    message = one_line(exc, quoted)
    return f"{said}: {message}" if message else said


def one_line(exc: BaseException, quoted: Sequence[str] = ()) -> str:
    """``exc``'s message on one line, each of ``quoted`` masked, at most ``_MESSAGE_CHARS``."""
    message = _text(exc)
    for text in quoted:  # longest first: a secret inside another is masked with it
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
