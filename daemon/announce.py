"""What the engine says about each change: its log line and its event for ``watch`` clients.

An accepted change is announced after its state was pushed (``change_accepted``, with
the old and new values); a rejected one at once (``change_rejected``, with every
problem's key, layer and reason); a live edit that a higher layer hides is a warning
(``update_shadowed``), and so is an etcd path that names no key (``etcd_path_ignored``,
without its value). Secret values are masked in all of them, and so, for a schema with
secrets, are the values of keys that are not leaves of it nor under a leaf that holds a
mapping; long values are cut.
The daemon's counters hear of each through ``on_accepted`` / ``on_rejected`` (the latter
with the etcd revision, the reason and the keys the change edited: status entries say
that a daemon rejected one, until those keys are edited again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hotknob.config import InvalidChange, Snapshot
from hotknob.config.changes import edits_inside
from hotknob.config.errors import Problem
from hotknob.config.nesting import value_at
from hotknob.config.secrecy import mask_secrets, shown_value

EventSink = Callable[[dict[str, Any]], None]
MAX_LISTED = 100
"""The most problems, and edited keys, a rejection's log line and event name one by one;
the most keys an accepted change's log line names."""


class Announcer:
    def __init__(
        self,
        log: Any,
        *,
        secrets: frozenset[str],
        broadcast: EventSink,
        on_accepted: Callable[[str, int], None],
        on_rejected: Callable[[str, int, str, tuple[str, ...]], None],
    ) -> None:
        self.log = log
        self._secrets = secrets
        self._broadcast = broadcast
        self._on_accepted = on_accepted
        self._on_rejected = on_rejected

    def accepted(
        self,
        layer: str,
        version: int,
        revision: int,
        changed: dict[str, Any],
        before: Mapping[str, Any],
    ) -> None:
        """An accepted change; ``before`` is the state it replaced, by dotted key.

        The log line names the first ``MAX_LISTED`` keys and cuts a long value, as a
        rejection's does: a file's mapping of 5000 weights made one line of 140 kB, which
        a log collector splits into pieces that are no JSON. The event for ``watch``
        clients carries the values whole."""
        old = mask_secrets({k: before.get(k) for k in changed}, self._secrets)
        changed = mask_secrets(changed, self._secrets)
        listed = list(changed)[:MAX_LISTED]
        unlisted = len(changed) - len(listed)
        self.log.info(
            "change_accepted",
            key=",".join(listed) + (",..." if unlisted else ""),
            old={k: _bounded(old[k]) for k in listed},
            new={k: _bounded(changed[k]) for k in listed},
            layer=layer,
            version=version,
            revision=revision,
            **({"unlisted": {"keys": unlisted}} if unlisted else {}),
        )
        self._broadcast(
            {
                "type": "event",
                "event": "change_accepted",
                "layer": layer,
                "version": version,
                "revision": revision,
                "changed": changed,
                "old": old,
                "time": time.time(),
            }
        )
        self._on_accepted(layer, version)

    def shadowed(
        self,
        snapshot: Snapshot,
        layer: str,
        edited: Mapping[str, Any],
        before: Mapping[str, Any],
    ) -> None:
        """Warn of each key ``layer`` edited whose value a higher layer's still wins.
        ``before`` holds the layer's values before the edit: a mapping it gave before too is
        looked at by the keys inside it that changed: a higher layer may set one of those
        alone (etcd's ``weights.head`` over a file's ``weights``), where it sets no value
        of the mapping whole."""
        for key, value in edited.items():
            old = before.get(key)
            if (
                isinstance(old, Mapping)
                and isinstance(value, Mapping)
                and snapshot.shadowing(layer, key) is None
            ):
                for inner, inner_value in edits_inside(key, old, value).items():
                    self._shadowed(snapshot, layer, inner, inner_value)
            else:
                self._shadowed(snapshot, layer, key, value)

    def _shadowed(self, snapshot: Snapshot, layer: str, key: str, value: Any) -> None:
        winner = snapshot.shadowing(layer, key)  # also over a key inside a mapping
        if winner is not None:
            self.log.warning(
                "update_shadowed",
                key=key,
                layer=layer,
                value=self.shown(key, value),
                winner=winner,
                effective=self.shown(key, value_at(snapshot.flat, key)),
            )

    def rejected(
        self,
        layer: str,
        revision: int,
        version: int,
        exc: InvalidChange,
        edited: Mapping[str, Any],
        in_force: Mapping[str, Any],
    ) -> None:
        """A rejected change of ``layer``: the values it would have set (``edited``, None
        for a key it removed) and those still in force (``in_force``, by dotted key), of
        ``version``.

        The log line and the event name the first ``MAX_LISTED`` problems and edited keys
        and count the rest (``unlisted``): a file with ten thousand unknown keys made an
        event over the socket's line limit, which was dropped, so ``watch`` clients never
        heard of the rejection."""
        listed = list(edited)[:MAX_LISTED]
        new = {k: _short(self.shown(k, edited[k])) for k in listed}
        old = {k: _short(self.shown(k, in_force.get(k))) for k in listed}
        problems = [
            {
                "key": p.key,
                "layer": p.layer,
                "reason": p.reason,
                "value": _short(self.shown(p.key, p.value)),
                **({"path": p.origin} if p.origin else {}),
            }
            for p in exc.problems[:MAX_LISTED]
        ]
        unlisted = {
            "problems": len(exc.problems) - len(problems),
            "keys": len(edited) - len(listed),
        }
        more = f"; and {unlisted['problems']} more" if unlisted["problems"] else ""
        self.log.warning(
            "change_rejected",
            key=",".join(p["key"] for p in problems) + (",..." if more else ""),
            layer=layer,
            old=old,
            new=new,
            reason="; ".join(str(p) for p in exc.problems[:MAX_LISTED]) + more,
            revision=revision,
            version=version,
            **({"unlisted": unlisted} if any(unlisted.values()) else {}),
        )
        event: dict[str, Any] = {
            "type": "event",
            "event": "change_rejected",
            "layer": layer,
            "revision": revision,
            "version": version,
            "old": old,
            "new": new,
            "problems": problems,
            "time": time.time(),
        }
        if any(unlisted.values()):
            event["unlisted"] = unlisted
        self._broadcast(event)
        self._on_rejected(layer, revision, str(exc), tuple(edited))

    def ignored(self, revision: int, faults: Sequence[Problem]) -> None:
        """Etcd paths under the prefix that name no key (``train.lr``, ``train//lr``): each
        is ignored, with one warning naming it, and the rest of its change goes on. Its
        value is left out: the path does not say whether a secret was meant."""
        for fault in faults:
            self.log.warning(
                "etcd_path_ignored", path=fault.key, reason=fault.reason, revision=revision
            )
            self._broadcast(
                {
                    "type": "event",
                    "event": "etcd_path_ignored",
                    "path": fault.key,
                    "reason": fault.reason,
                    "revision": revision,
                    "time": time.time(),
                }
            )

    def shown(self, key: str, value: Any) -> Any:
        """``value`` as it may appear in a log or an event: a secret key's value is masked,
        and so, for a schema with secrets, is that of a key that is neither one of its
        leaves nor under a leaf that holds a mapping (``hides``): a section key holding a
        JSON object, a mistyped key."""
        return shown_value(key, value, self._secrets)


def _bounded(value: Any, limit: int = 200) -> Any:
    """``value`` as an accepted change's log line shows it: a scalar as ``_short`` does, and
    a list or a mapping as it is unless its ``repr`` is longer than ``limit`` (then cut,
    as ``_short`` cuts it): a small section stays JSON, and a big one does not fill the
    line."""
    if isinstance(value, int | float | bool | str | bytes) or value is None:
        return _short(value, limit)
    return value if len(repr(value)) <= limit else _short(value, limit)


def _short(value: Any, limit: int = 200) -> Any:
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} chars)"
    if isinstance(value, int | float | bool | str) or value is None:
        return value
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
