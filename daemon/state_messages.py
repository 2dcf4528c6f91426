"""The lines a published state is sent as: a snapshot, or an update from a state before.

Every client at one version is sent the same bytes for a state: its snapshot (a client
that has been sent nothing yet) or its update from that version (``changed`` computed
against what *it* was last sent). Each line is encoded once for all of them and kept
until another state is published.

It is apart from the server (``socket_server``) because it knows nothing of
connections, writers or the socket: only a state, the one before it, and what each
snapshot names (the restart-only and secret keys, the app).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from hotknob.config.changes import changed_keys
from hotknob.model_runtime import protocol

from .published import Published


class StateMessages:
    """The encoded lines of the newest state asked for; ``restart_only`` and ``secret``
    (the keys the schema keeps secret), and ``app``, are named in each snapshot. Any
    thread: the cache is held under a lock."""

    def __init__(self, restart_only: Iterable[str], secret: Iterable[str], app: str | None):
        self._app = app
        self._restart_only = sorted(restart_only)
        self._secret = sorted(secret)
        self._encoded: dict[int | None, bytes] = {}
        # The state those lines are of: the object, not its version. A state can be
        # published again at its version with other ``sources`` and ``revision`` (a write
        # that moved a key to another layer without changing its value).
        self._encoded_for: Published | None = None
        self._encode_lock = threading.Lock()

    def message_for(self, sent: Published | None, target: Published) -> bytes:
        """The encoded snapshot (``sent`` is None) or update; shared by clients at one version."""
        key = None if sent is None else sent.version
        with self._encode_lock:
            if self._encoded_for is not target:
                self._encoded = {}
                self._encoded_for = target
            data = self._encoded.get(key)
            if data is None:
                if sent is None:
                    message = protocol.snapshot(
                        target.version,
                        target.revision,
                        target.values,
                        target.sources,
                        self._restart_only,
                        self._secret,
                        self._app,
                    )
                else:
                    changed = changed_keys(sent.flat, target.flat)
                    message = protocol.update(
                        target.version, target.revision, changed, target.values
                    )
                data = protocol.encode(message)
                self._encoded[key] = data
            return data
