"""What runs when the applied values change: bindings, then ``on_change`` callbacks.

Registered and run on the training thread only (in ``LiveConfig.apply`` or
``load_state_dict``), never on the connection's thread. Guarantees:

* bindings run in registration order, before callbacks; both only when some value
  changed, and bindings see every flat value plus the subset that changed;
* a callback on a leaf (``train.lr``) or a section (``train``) fires once when any
  key under it changed or went away, with the new value (None for a key that is gone),
  and the old one if it takes two arguments;
* one that raises is logged and reported in the returned errors (they go to the
  daemon in the ``applied`` acknowledgement); the others still run. The value of a key
  in ``secret`` is masked in both: a callback that raises ``auth failed with <token>``
  would otherwise write the token to the process's log;
* one removed while they run (by an earlier callback) does not run any more, from
  that moment on; one registered meanwhile first runs at the next change;
* with nothing registered, running them costs one check.

Bindings' checkpoint states are saved and restored by registration order; a
binding that replaces another (``add_binding(..., in_place_of=...)``, as a rebind of
an optimizer does) takes the replaced one's place in that order, so a resumed run
that binds the same objects in the same order gets each state back where it was
saved.
"""

from __future__ import annotations

import itertools
import logging
import math
import traceback
from collections.abc import Callable, Collection
from functools import partial
from types import MappingProxyType
from typing import Any

from .binding import Binding, Handle
from .received import MISSING, State, get_dotted, prefixes, same_leaf

log = logging.getLogger("hotknob.model_runtime")

SECRET_SHOWN = "**********"  # a secret's value in a log line, as the daemon shows one


class _Callback:
    __slots__ = ("fn", "key", "wants_old")

    def __init__(self, key: str, fn: Callable[..., object], wants_old: bool) -> None:
        self.key = key
        self.fn = fn
        self.wants_old = wants_old


def _wants_old(fn: Callable[..., object]) -> bool:
    import inspect

    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): call with the new value only
        return False
    return True


def _value(state: State, key: str) -> Any:
    """The value at ``key`` (a leaf or a section); None if ``state`` has no such key."""
    value = state.flat.get(key, MISSING)
    return get_dotted(state.values, key, None) if value is MISSING else value


# Frozen values that ``==`` may take for equal while they differ: ``(1,) == (1.0,)``.
_CONTAINERS = frozenset({tuple, MappingProxyType})


class Hooks:
    """The bindings and callbacks of one ``LiveConfig``; each registration returns a
    ``Handle`` whose ``remove()`` takes it out again."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._bindings: dict[int, Binding] = {}
        self._callbacks: dict[int, _Callback] = {}
        self.secret: frozenset[str] = frozenset()
        """The keys whose values are secret, as the daemon's snapshot names them (set by
        ``LiveConfig``): their values never appear in what a failure logs or reports."""

    def on_change(self, key: str, fn: Callable[..., object]) -> Handle:
        ident = next(self._ids)
        self._callbacks[ident] = _Callback(key, fn, _wants_old(fn))
        return Handle(partial(self._callbacks.pop, ident, None))

    def add_binding(self, binding: Binding, *, in_place_of: Collection[Binding] = ()) -> Handle:
        """Register ``binding`` last, or, if it replaces registered bindings (``in_place_of``),
        in the place of the first of them, and take those out: its checkpoint state is then
        saved where theirs was (see the module doc)."""
        ident = next(self._ids)
        bindings = self._bindings
        replaced = [k for k, b in bindings.items() if any(b is r for r in in_place_of)]
        if not replaced:
            bindings[ident] = binding
        else:  # rebuilt in place: each ``Handle`` holds this dict's ``pop``
            items = list(bindings.items())
            bindings.clear()
            for key, kept in items:
                if key == replaced[0]:
                    bindings[ident] = binding
                elif key not in replaced:
                    bindings[key] = kept
        return Handle(partial(bindings.pop, ident, None))

    def run(self, old: State, new: State) -> list[dict[str, str]]:
        """Run what the change from ``old`` to ``new`` concerns; the errors, if any."""
        if not self._bindings and not self._callbacks:
            return []
        before = old.flat
        # A change of type counts (protocol.md): 1 -> 1.0, 0 -> False; and a zero's sign,
        # inside a list or mapping too: the daemon pushes 0.0 -> -0.0 and [1] -> [1.0].
        changed = {
            k: v
            for k, v in new.flat.items()
            if (o := before.get(k, MISSING)) is not v
            and (
                type(o) is not type(v)
                or o != v
                or (
                    type(v) is float and v == 0.0 and math.copysign(1.0, v) != math.copysign(1.0, o)
                )
                or (type(v) in _CONTAINERS and not same_leaf(o, v))
            )
        }
        removed = old.flat.keys() - new.flat.keys()  # a daemon restarted on another schema
        if not changed and not removed:
            return []
        errors: list[dict[str, str]] = []
        changed_view = MappingProxyType(changed)
        bindings = self._bindings
        for ident, binding in list(bindings.items()) if changed else ():
            if bindings.get(ident) is not binding:
                continue  # removed (or replaced) by a binding that ran before it
            try:
                binding.apply(new.flat_view, changed_view)
            except Exception as exc:
                name = type(binding).__name__
                said = _Failure(exc, self._secret_texts(old, new))
                said.log("live_binding_failed binding=%s version=%d", name, new.version)
                errors.append({"binding": name, "error": said.error})
        touched = prefixes([*changed, *removed])
        callbacks = self._callbacks
        for ident, callback in list(callbacks.items()):
            if callback.key not in touched or callbacks.get(ident) is not callback:
                continue  # not concerned, or removed by a callback that ran before it
            value = _value(new, callback.key)
            try:
                if callback.wants_old:
                    callback.fn(value, get_dotted(old.values, callback.key, None))
                else:
                    callback.fn(value)
            except Exception as exc:
                said = _Failure(exc, self._secret_texts(old, new))
                said.log("live_callback_failed key=%s version=%d", callback.key, new.version)
                errors.append({"key": callback.key, "error": said.error})
        return errors

    def _secret_texts(self, old: State, new: State) -> tuple[str, ...]:
        """The secret values of ``old`` and ``new`` as a failure's text may quote them
        (as given, and as their ``repr`` writes them inside its quotes), longest first."""
        texts: set[str] = set()
        for key in self.secret:
            for state in (old, new):
                value = state.flat.get(key)
                if isinstance(value, str) and value:
                    texts.update((value, repr(value)[1:-1]))
        return tuple(sorted(texts, key=len, reverse=True))

    def binding_states(self) -> list[Any]:
        """Each binding's own checkpoint state (``None`` for one that keeps none)."""
        states = []
        for binding in self._bindings.values():
            save = getattr(binding, "state_dict", None)
            states.append(save() if callable(save) else None)
        return states

    def load_binding_states(self, saved: list[Any]) -> None:
        """Give each binding its state from ``binding_states``, in registration order.

        All or nothing: a state that a binding refuses (an ``OptimizerBinding`` refuses
        one saved for other keys or other param groups) raises ``ValueError`` naming
        both, after the bindings already given theirs got their own back."""
        bindings = list(self._bindings.values())
        if any(s is not None for s in saved) and len(saved) != len(bindings):
            raise ValueError(
                f"checkpoint holds state for {len(saved)} bindings but {len(bindings)} are "
                "registered: bind the same objects before load_state_dict"
            )
        restore: list[tuple[Callable[[Any], object], Any]] = []
        try:
            for i, (binding, state) in enumerate(zip(bindings, saved, strict=False)):
                if state is None:
                    continue
                load = getattr(binding, "load_state_dict", None)
                if not callable(load):
                    raise ValueError(f"{type(binding).__name__} cannot load its checkpointed state")
                save = getattr(binding, "state_dict", None)
                before = save() if callable(save) else None
                try:
                    load(state)
                except Exception as exc:
                    raise ValueError(
                        f"the checkpoint's binding state {i} (in registration order, from 0) "
                        f"does not fit the binding registered there ({_describe(binding)}): "
                        f"{exc}; register the same bindings (bind_optimizer the same "
                        "optimizers, for the same keys) in the same order as the run that "
                        "saved it, before load_state_dict"
                    ) from exc
                if before is not None:
                    restore.append((load, before))
        except BaseException:
            for load, before in reversed(restore):
                load(before)
            raise


class _Failure:
    """A binding's or callback's exception as the log and the ack say it, with every
    secret value in its text (``secrets``) masked."""

    def __init__(self, exc: Exception, secrets: tuple[str, ...]) -> None:
        self._exc = exc
        self._secrets = secrets
        self.error = self._masked(f"{type(exc).__name__}: {exc}")

    def _masked(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, SECRET_SHOWN)
        return text

    def log(self, message: str, *args: Any) -> None:
        """Log the failure with its traceback; one that quotes a secret is logged as text,
        masked, since a handler would format the exception itself, secret and all."""
        told = "".join(traceback.format_exception(self._exc))
        masked = self._masked(told)
        if masked == told:
            log.error(message, *args, exc_info=self._exc)
        else:
            log.error(message + "\n%s", *args, masked.rstrip("\n"))


def _describe(binding: Binding) -> str:
    """A binding's class and, for one that says so, the keys it drives."""
    keys = getattr(binding, "keys", None)
    name = type(binding).__name__
    if isinstance(keys, Collection) and not isinstance(keys, str):
        return f"{name} for {', '.join(sorted(map(str, keys)))}"
    return name
