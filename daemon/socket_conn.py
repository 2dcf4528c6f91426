"""One client's connection to the socket server: its transport, its pending state and
its queued events, and how it is closed.

The server (``socket_server``) owns the connections and runs one reader and one
writer task for each; this holds the state they share, all on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from hotknob.model_runtime import protocol

from .published import ClientInfo, Published

CLOSE_GRACE_S = 2.0


class Stuck(Exception):
    """The client is not reading; it is disconnected so it cannot hold memory."""


class Connection:
    def __init__(
        self,
        conn_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        uid: int,
        peer_pid: int,
        log: Any,
    ):
        self.id = conn_id
        self.reader = reader
        self.writer = writer
        self.uid = uid
        self.peer_pid = peer_pid
        self.log = log
        self.connected_at = time.time()
        self.info: ClientInfo | None = None
        self.pending: Published | None = None
        self.last_sent: Published | None = None
        self.events: deque[bytes] = deque()
        self.event_bytes = 0
        self.wake = asyncio.Event()
        self.busy = False
        self.writer_task: asyncio.Task[None] | None = None
        self.reason: str | None = None

    @property
    def closing(self) -> bool:
        return self.writer.transport.is_closing()

    def drop(self, reason: str, *, reply: str | None = None, abort: bool = False) -> None:
        """Close this connection, first sending ``reply`` as an ``error`` line if given."""
        if self.reason is None:
            self.reason = reason
        transport = self.writer.transport
        if transport.is_closing():
            return
        if reply is not None and not abort:
            self.writer.write(protocol.encode(protocol.error(reply[:4096])))
        if abort:
            transport.abort()
        else:
            transport.close()

    async def wait_closed(self) -> None:
        """Wait for the transport to finish closing; abort it after ``CLOSE_GRACE_S``."""
        try:
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_GRACE_S)
        except TimeoutError:
            self.writer.transport.abort()
        except Exception:  # the peer's own error while closing: nothing left to do
            pass
