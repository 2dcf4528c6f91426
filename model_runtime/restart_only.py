"""Restart-only keys, held in a process at the values it runs.

A restart-only key (the schema marks it so: a batch size a data loader was built with)
takes a new value only when the process restarts. Its daemon may send another value (one
restarted after the key changed started with the new one), so once the process has
applied a state, every state it receives is held at the restart-only values it runs
(``RestartOnlyHold.hold``), marked ``held``, and said once in the log. Its acks name the
keys held and the fingerprints of the values run (``held_fields``): its daemon tells from
them a process that waits for a restart from one that already runs the value wanted.

Apart from ``client.LiveConfig`` because it is one rule with its own state (the keys, and
what was logged), applied at several points of the client (a state received, the first
state applied, a checkpoint loaded, an ack): the client decides when, this module what.
"""

from __future__ import annotations

import logging
from typing import Any

from . import protocol
from .hooks import SECRET_SHOWN
from .received import ABSENT, NOTHING, State, get_dotted, thaw, with_held

log = logging.getLogger("hotknob.model_runtime")


class RestartOnlyHold:
    """The schema's restart-only keys and the holding of received states at the values
    the process runs."""

    def __init__(self) -> None:
        # The schema's restart-only keys, as the daemon's last snapshot named them: once a
        # state is applied, each is held at the value the process runs (``hold``).
        self.keys: frozenset[str] = frozenset()
        self.secret: frozenset[str] = frozenset()  # the keys whose values not to log
        self._said: set[tuple[str, str]] = set()  # (key, daemon's value) logged

    def hold(self, state: State, applied: State) -> State:
        """``state`` with each restart-only key at the value this process runs (``applied``),
        once it has applied one: a daemon holds such a key at the value it started with, and
        a daemon restarted after the key changed (its container, by a probe; or by hand, for
        a new flag) started with the new value. Only a restart of the process takes that."""
        if applied is NOTHING:  # the first state: what the process starts with
            return state
        running = values_of(applied, self.keys)
        held = with_held(state, running)
        for key in held.held:
            wanted = thaw(get_dotted(state.values, key))
            said = (key, repr(wanted))
            if said not in self._said:
                self._said.add(said)
                was, now = (
                    (SECRET_SHOWN, SECRET_SHOWN)
                    if key in self.secret
                    else (thaw(running[key]), wanted)
                )
                log.warning(
                    "live_restart_only_held key=%s running=%.200r daemon=%.200r: a restart-only "
                    "key keeps the value this process started with; a restart takes the new one",
                    key,
                    was,
                    now,
                )
        return held

    def at_load(self, newer: State | None, agreed: State | None) -> dict[str, Any]:
        """The restart-only values a loaded checkpoint takes: the daemon's (``newer``, its
        state newer than the checkpoint), else none (the checkpoint's stand).

        Under a group (``agreed``: the applied state, else None), the values the ranks
        agreed on, which every rank holds whatever its daemon says: each rank decides alone
        whether its daemon is newer (``LiveConfig._load`` runs no collective), and two
        daemons may hold different restart-only values (one restarted after a restart-only
        ``set``). Taken from one rank's own daemon, a batch size read right after the load
        would differ across ranks, and the next agreement would change it on some ranks
        only. In the usual case (the daemons agree) these are the daemon's values as well."""
        if not self.keys:
            return {}
        if agreed is not None:
            return {} if agreed is NOTHING else values_of(agreed, self.keys)
        return {} if newer is None else values_of(newer, self.keys)


def held_fields(state: State) -> dict[str, Any]:
    """An ack's fields for the restart-only keys ``state`` holds, if any: ``held``, and
    the fingerprint of the value this process runs for each (``held_digests``). Its
    daemon knows the value wanted: a process that runs it (it started with the value
    etcd holds again, after its daemon restarted alone) waits for no restart."""
    if not state.held:
        return {}
    digests = {
        key: protocol.held_digest(thaw(value))
        for key, value in values_of(state, frozenset(state.held)).items()
    }
    return {"held": list(state.held), "held_digests": digests}


def values_of(state: State, keys: frozenset[str]) -> dict[str, Any]:
    """``state``'s values of ``keys`` it has (leaves, or fields that hold a mapping)."""
    values = {}
    for key in keys:
        value = state.flat.get(key, ABSENT)
        if value is ABSENT:  # a field that holds a mapping
            value = get_dotted(state.values, key, ABSENT)
        if value is not ABSENT:
            values[key] = value
    return values
