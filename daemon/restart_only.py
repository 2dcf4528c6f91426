"""Restart-only keys: clients keep the value such a key had when the daemon started.

A field marked restart-only (``json_schema_extra={"live": False}``) is never hot-pushed.
A change to it is still validated and accepted into the layers and the snapshot
(``explain`` shows it), but what clients get keeps the running value, and the key is
reported as pending a restart (``restart_pending``, once per new wanted value) until
its wanted value is the running one again (``restart_pending_cleared``): each a log line
and an event for ``watch`` clients. A secret key's values are masked wherever they are
reported (the log line, the event, ``/healthz``): clients get them, people do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from hotknob.config import Snapshot
from hotknob.config.changes import same_value
from hotknob.config.secrecy import mask_secrets, shown_value

# What an operator does about a ``restart_pending`` key: a process restarted alone gets
# the running value again from this daemon, so the daemon is what must restart.
_PENDING_DETAIL = (
    "running processes keep the running value: restart this daemon (then the processes) "
    "for them to take the wanted one"
)


class RestartOnly:
    def __init__(
        self,
        keys: frozenset[str],
        log: Any,
        on_pending: Callable[[], None] = lambda: None,
        secrets: frozenset[str] = frozenset(),
        broadcast: Callable[[dict[str, Any]], None] = lambda event: None,
    ):
        self.keys = keys
        self.secrets = secrets  # the schema's (``secret_keys``): their values are never shown
        self.running: dict[str, Any] = {}  # by dotted key: the values clients keep
        # By dotted key: the values a restart would bring. Never edited: ``track`` replaces it.
        self.pending: dict[str, Any] = {}
        self._log = log
        self._on_pending = on_pending  # the keys pending a restart changed
        self._broadcast = broadcast  # to ``watch`` clients: a change that altered nothing
        # in force (the key held back) is no ``change_accepted``, and was heard of nowhere

    def start(self, flat: Mapping[str, Any]) -> None:
        """The daemon started with ``flat`` (by dotted key): those values are the running ones."""
        self.running = {key: flat[key] for key in self.keys if key in flat}

    def shown_pending(self) -> dict[str, Any]:
        """``pending`` as it may be shown (``/healthz``): a secret's value masked."""
        return mask_secrets(self.pending, self.secrets)

    def held_back(self, wanted: Mapping[str, Any]) -> dict[str, Any]:
        """The keys whose running value differs from ``wanted`` (by dotted key; the type
        counts), with that running value."""
        return {
            k: v for k, v in self.running.items() if k not in wanted or not same_value(wanted[k], v)
        }

    def in_force(self, values: Mapping[str, Any], flat: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` (nested, JSON form; ``flat`` the same by dotted key) as clients get
        them: with the running values. The sections are shared with ``values`` unless a
        value is held back (then they are copies): neither is ever edited."""
        held = self.held_back(flat)
        if not held:
            return dict(values)
        copied = _deep_copy(values)
        for key, value in held.items():
            _set_dotted(copied, key, value)
        return copied

    def track(self, snapshot: Snapshot, layer: str, revision: int = 0) -> None:
        """Update what is pending after ``layer``'s change made ``snapshot``; warn of a new
        wanted value. ``on_pending`` is told of one too, not only of a key pending or no
        longer: which processes run the wanted value already (a process restarted alone
        holds the value it started with) changes with it (``feedback.ClientFeedback``)."""
        # Built aside and swapped whole: the loop reads ``pending`` (status entries, through
        # ``Engine.pending_restart``) without the daemon's lock while a lone change is taken
        # on the watch thread, and a dict edited in place while read raised there.
        before = self.pending
        pending = dict(before)
        changed = False
        for key, running in self.running.items():
            wanted = snapshot.flat.get(key)
            # The type counts, as for what clients get (``held_back``): a key wanted at 1.0
            # that runs at 1 is held back, and a restart changes it.
            if not same_value(wanted, running):
                if not same_value(pending.get(key, running), wanted):
                    changed = True
                    said = {
                        "key": key,
                        "running": shown_value(key, running, self.secrets),
                        "wanted": shown_value(key, wanted, self.secrets),
                        "layer": layer,
                        "revision": revision,
                    }
                    self._log.warning("restart_pending", **said, detail=_PENDING_DETAIL)
                    self._event("restart_pending", said)
                pending[key] = wanted
            elif key in pending:
                del pending[key]
                self._cleared(key, running, layer, revision)
        self.pending = pending
        if changed or pending.keys() != before.keys():
            self._on_pending()

    def _cleared(self, key: str, running: Any, layer: str, revision: int) -> None:
        """``key`` is wanted at its running value again (the change reverted before any
        restart): no restart is needed for it any more. Said, as its ``restart_pending``
        was, so that an operator who saw that one does not restart for nothing."""
        said = {
            "key": key,
            "running": shown_value(key, running, self.secrets),
            "layer": layer,
            "revision": revision,
        }
        detail = "wanted at its running value again: no restart is needed for it"
        self._log.info("restart_pending_cleared", **said, detail=detail)
        self._event("restart_pending_cleared", said)

    def _event(self, name: str, said: Mapping[str, Any]) -> None:
        self._broadcast({"type": "event", "event": name, **said, "time": time.time()})


def _deep_copy(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the sections of a JSON-form value (plain dicts), so that they can be edited."""
    return {k: _deep_copy(v) if type(v) is dict else v for k, v in values.items()}


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = values
    for part in sections:
        node = node.setdefault(part, {})
    node[leaf] = value
