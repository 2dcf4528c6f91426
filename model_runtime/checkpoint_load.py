"""Loading a checkpoint into a ``LiveConfig``: ``load_state_dict``, and what it changes.

The checkpoint's values become the applied ones; the bindings get their saved state back
first, then run for the keys it changed. The daemon's state wins over the checkpoint's
only if it is newer (``checkpoint.newer_than``): then it becomes pending; else the
checkpoint stays in force and the daemon's state it replaced is kept as superseded, so
that the same state sent again changes nothing. Restart-only keys keep the values the
process runs, and under a group the ranks decide together at the next agreement
(``distributed.StepSync.loaded``). Bound as methods of ``client.LiveConfig`` under the
same names (``load_state_dict``, ``_load``).

Apart from ``client.LiveConfig`` because a load is its own way into the client's state,
once at a resume, beside ``apply``: it takes the same apply lock (``_begin_apply``) and
the one state lock, and moves the same states. ``checkpoint`` holds the format it reads;
this module what a load changes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import checkpoint
from .received import State, with_held

if TYPE_CHECKING:
    from .client import LiveConfig


def load_state_dict(live: LiveConfig, state_dict: Mapping[str, Any]) -> None:
    """Make a checkpoint's values the applied ones.

    Bindings get their saved state back first (register them before
    loading, in the order the saving run first registered them: a rebind
    keeps the place of the binding it replaced), then bindings and callbacks
    see the keys the checkpoint changed, so every bound object agrees with
    ``values``. A saved binding state that does not fit the binding in its
    place (``OptimizerBinding``: other keys, or groups of other sizes) raises
    ``ValueError`` and changes nothing. If the daemon has
    already sent a state newer than the checkpoint's (a higher version, or one built
    from a later etcd revision: etcd moved on since the checkpoint was saved, which
    also tells a daemon that restarted without its state dir, its versions begun
    again at 1), that state becomes pending and wins at the next ``apply``; else
    the checkpoint stays in force,
    and the daemon's state it replaced does not come back by itself (a reconnect
    that re-sends that state, the same values at the same etcd revision, changes
    nothing, whatever version a restarted daemon gives it). Anything else the daemon
    sends after the load is a new edit and is applied as usual.

    Under torch.distributed the ranks decide together, at the next agreement:
    each rank's daemon numbers its versions itself, so one rank may find its
    daemon newer than the checkpoint where another does not. If any rank does,
    every rank takes its daemon's state back and the ranks agree on it as on any
    change; else the checkpoint stays in force on every rank.
    """
    loaded = checkpoint.read(state_dict)
    step = state_dict.get("step", 0)
    live._begin_apply()
    try:
        live._load(loaded, step, state_dict.get("bindings") or [])
    finally:
        live._end_apply()


def _load(live: LiveConfig, loaded: State, step: Any, binding_states: list[Any]) -> None:
    live._hooks.load_binding_states(binding_states)
    with live._lock:
        # The daemon's newest state: the one an earlier checkpoint replaced, if one did.
        latest = live._superseded or live._latest
        newer = latest is not None and checkpoint.newer_than(latest, loaded)
        agreed = live._applied if live._sync is not None else None
        running = live._restart_only.at_load(latest if newer else None, agreed)
        if running:
            # A resumed run starts with the daemon's restart-only values, at once: read
            # after the load (a data loader built with the batch size), they must not
            # change at the first apply.
            loaded = with_held(loaded, running)
            loaded.held = ()
        old, live._applied = live._applied, loaded
        live._unacked = False
        live._applied_step = step if isinstance(step, int) else 0
        live._applied_at = time.time()
        live._pending = latest if newer else None
        if newer:
            live._superseded = None
            live._latest = latest
        else:
            live._superseded = latest
            live._latest = loaded  # what the ranks converge to, under a group
    if live._sync is None:
        live._hooks.run(old, loaded)
        return
    live._sync.loaded(loaded, newer=newer)
    with live._sync.uncounted():
        live._hooks.run(old, loaded)
