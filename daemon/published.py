"""The values that pass between the engine, the socket server and the daemon.

``Published`` is an accepted state as the engine hands it to the server (and the
server to every client); ``ClientInfo`` is what the server knows of a client that
said ``hello``, as the daemon sees it in status and acknowledgements. Both are
frozen: a new state or a new client is a new value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Published:
    """One accepted state as the engine publishes it; frozen and swapped whole."""

    version: int
    revision: int
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    flat: Mapping[str, Any]


@dataclass(frozen=True)
class ClientInfo:
    """A client that said ``hello``. ``pid`` is the one it announced, else its peer pid."""

    id: int
    name: str
    pid: int | None
    uid: int
    connected_at: float
    extra: Mapping[str, Any] = field(default_factory=dict)
    peer_pid: int | None = None

    @property
    def watch(self) -> bool:
        """Whether the client subscribed to ``event`` messages (``"watch": true``)."""
        return self.extra.get("watch") is True
