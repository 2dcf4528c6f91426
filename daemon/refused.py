"""The etcd values a daemon refused and still runs without: the ``rejected`` field of its
processes' status entries.

A rejected etcd revision changes nothing, and the daemon goes on taking later revisions
for other keys: the refused value stays in etcd, and this daemon runs the value it had.
So a refusal lasts until a later revision that this daemon takes edits those keys again
(a put or a delete), or until a full read of etcd takes them, not until the next
revision it takes: an edit of ``train.lr`` does not make a node that refused
``sampling.temperature=1.5`` run what etcd says. ``status`` and ``set --wait``, run
elsewhere, read it from the status entries.

Called by the daemon under the lock it holds around the engine (from the loop, or the
etcd watch thread for a change that comes alone); ``newest`` may be read from any thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hotknob.config.keys import key_from_etcd

from .table import cut

REASON_CHARS = 500
"""The longest reason a status entry carries: it says why, not all of it."""


class RefusedKeys:
    """Per dotted key, the etcd revision whose value for it this daemon refused, and why."""

    def __init__(self, app: str) -> None:
        self._app = app
        self._keys: dict[str, tuple[int, str]] = {}
        self.newest: dict[str, Any] | None = None
        """The newest refusal still in force: ``revision``, ``reason``, and ``keys``, every
        key still refused (by any revision); None if none is. Replaced whole on a change."""

    def __bool__(self) -> bool:
        return bool(self._keys)

    def refused(self, revision: int, reason: str, keys: Iterable[str]) -> bool:
        """Etcd's ``revision`` was rejected: its ``keys`` keep the values in force. True
        if ``newest`` changed."""
        entry = (revision, cut(reason, REASON_CHARS))
        for key in keys:
            self._keys[key] = entry
        return self._update()

    def taken(self, revision: int, paths: Iterable[str]) -> bool:
        """Etcd's ``revision``, which edited ``paths``, was not rejected: the keys it edited
        run what etcd says now (a refusal of this same revision stays). True if
        ``newest`` changed."""
        if not self._keys:
            return False
        for path in paths:
            key = key_from_etcd(self._app, path)
            if key is None:
                continue
            held = self._keys.get(key)
            if held is not None and held[0] < revision:
                del self._keys[key]
        return self._update()

    def clear(self) -> bool:
        """A full read of etcd: what it refuses is said again (``refused``) as it is read."""
        self._keys.clear()
        return self._update()

    def _update(self) -> bool:
        newest: dict[str, Any] | None = None
        if self._keys:
            revision, reason = max(self._keys.values(), key=lambda held: held[0])
            newest = {"revision": revision, "reason": reason, "keys": sorted(self._keys)}
        changed = newest != self.newest
        self.newest = newest
        return changed
