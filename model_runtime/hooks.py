"""What runs when the applied values change: bindings, then ``on_change`` callbacks.

Registered and run on the training thread only (in ``LiveConfig.apply`` or
``load_state_dict``), never on the connection's thread. Guarantees:

* bindings run in registration order, before callbacks; both only when some value
  changed, and bindings see every flat value plus the subset that changed;
* a callback on a leaf (``train.lr``) or a section (``train``) fires once when any
  key under it changed or went away, with the new value (None for a key that is gone),
  and the old one if it takes two arguments;
* one that raises is logged and reported in the returned errors (they go to the
  daemon in the ``applied`` acknowledgement); the others still run;
* with nothing registered, running them costs one check.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from functools import partial
from types import MappingProxyType
from typing import Any

from .binding import Binding, Handle
from .received import MISSING, State, get_dotted, prefixes

log = logging.getLogger("hotknob.model_runtime")


class _Callback:
    __slots__ = ("fn", "key", "wants_old")

    def __init__(self, key: str, fn: Callable[..., None], wants_old: bool) -> None:
        self.key = key
        self.fn = fn
        self.wants_old = wants_old


def _wants_old(fn: Callable[..., None]) -> bool:
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


class Hooks:
    """The bindings and callbacks of one ``LiveConfig``; each registration returns a
    ``Handle`` whose ``remove()`` takes it out again."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._bindings: dict[int, Binding] = {}
        self._callbacks: dict[int, _Callback] = {}

    def on_change(self, key: str, fn: Callable[..., None]) -> Handle:
        ident = next(self._ids)
        self._callbacks[ident] = _Callback(key, fn, _wants_old(fn))
        return Handle(partial(self._callbacks.pop, ident, None))

    def add_binding(self, binding: Binding) -> Handle:
        ident = next(self._ids)
        self._bindings[ident] = binding
        return Handle(partial(self._bindings.pop, ident, None))

    def run(self, old: State, new: State) -> list[dict[str, str]]:
        """Run what the change from ``old`` to ``new`` concerns; the errors, if any."""
        if not self._bindings and not self._callbacks:
            return []
        changed = {k: v for k, v in new.flat.items() if old.flat.get(k, MISSING) != v}
        removed = old.flat.keys() - new.flat.keys()  # a daemon restarted on another schema
        if not changed and not removed:
            return []
        errors: list[dict[str, str]] = []
        changed_view = MappingProxyType(changed)
        for binding in list(self._bindings.values()) if changed else ():
            try:
                binding.apply(new.flat_view, changed_view)
            except Exception as exc:
                name = type(binding).__name__
                log.exception("live_binding_failed binding=%s version=%d", name, new.version)
                errors.append({"binding": name, "error": f"{type(exc).__name__}: {exc}"})
        touched = prefixes([*changed, *removed])
        for callback in list(self._callbacks.values()):
            if callback.key not in touched:
                continue
            value = _value(new, callback.key)
            try:
                if callback.wants_old:
                    callback.fn(value, get_dotted(old.values, callback.key, None))
                else:
                    callback.fn(value)
            except Exception as exc:
                log.exception("live_callback_failed key=%s version=%d", callback.key, new.version)
                errors.append({"key": callback.key, "error": f"{type(exc).__name__}: {exc}"})
        return errors

    def binding_states(self) -> list[Any]:
        """Each binding's own checkpoint state (``None`` for one that keeps none)."""
        states = []
        for binding in self._bindings.values():
            save = getattr(binding, "state_dict", None)
            states.append(save() if callable(save) else None)
        return states

    def load_binding_states(self, saved: list[Any]) -> None:
        """Give each binding its state from ``binding_states``, in registration order."""
        bindings = list(self._bindings.values())
        if any(s is not None for s in saved) and len(saved) != len(bindings):
            raise ValueError(
                f"checkpoint holds state for {len(saved)} bindings but {len(bindings)} are "
                "registered: bind the same objects before load_state_dict"
            )
        for binding, state in zip(bindings, saved, strict=False):
            if state is None:
                continue
            load = getattr(binding, "load_state_dict", None)
            if not callable(load):
                raise ValueError(f"{type(binding).__name__} cannot load its checkpointed state")
            load(state)
