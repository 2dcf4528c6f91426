"""One client's connection to the socket server: its transport, its pending state and
its queued events, how it is written to from another thread, and how it is closed.

The server (``socket_server``) owns the connections and runs one reader and one
writer task for each, on the event loop. A state may also be pushed from another
thread (the etcd watch thread, for a change that comes alone): ``lock`` guards the
write side (``pending``, ``last_sent``, ``busy``, the bytes on the wire), and such a
thread writes through a duplicate of the socket (``send_from_thread``), never
through the transport, which belongs to the loop. Bytes a thread could not write
(the client's buffer was full) are ``carry``: the loop writes them before anything else.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from hotknob.config.keys import shown_text
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
        self.said_unknown_version = False  # ``applied_unknown_version``: once per connection
        self.lock = threading.RLock()
        self._loop = asyncio.get_running_loop()
        self._out: socket.socket | None = None
        self._carry: bytes | None = None

    @property
    def closing(self) -> bool:
        return self.writer.transport.is_closing()

    def open_side_channel(self) -> None:
        """Let other threads write to this client (``send_from_thread``). Loop thread.

        Opened once the client said ``hello`` (it costs a file descriptor, and a
        connection that has not said it is sent nothing). Without a descriptor to spare
        (the process is at its limit) the connection goes on without one: every state
        then goes through the loop, a little later, as it does for a busy client."""
        fd = self.writer.get_extra_info("socket").fileno()
        try:
            out = socket.socket(fileno=os.dup(fd))
        except OSError:
            return
        out.setblocking(False)
        with self.lock:
            self._out = out

    def offered_version(self) -> int | None:
        """The newest version this connection was sent or has waiting to be sent (None
        before the first): a process can have applied no later one. Any thread."""
        with self.lock:
            states = (self.last_sent, self.pending)
        return max((state.version for state in states if state is not None), default=None)

    def idle(self) -> bool:
        """Whether a state may be written now, ahead of the writer task: one was sent
        before, the writer is idle, nothing is queued and the transport holds nothing
        back. The caller holds ``lock``."""
        return not (
            self.last_sent is None
            or self.busy
            or self.wake.is_set()
            or self.events
            or self._carry is not None
            or self.closing
            or self.writer.transport.get_write_buffer_size()
        )

    def write(self, data: bytes) -> None:
        """Write ``data`` through the transport, after any ``carry``. Loop thread."""
        with self.lock:
            self._write_carry()
            self.writer.write(data)

    def send_from_thread(self, data: bytes) -> bool:
        """Write ``data`` from a thread that is not the loop's; the caller holds ``lock``
        and has checked ``idle()``. False if nothing could be sent (the loop will see
        why); what the socket did not take is written by the loop next."""
        if self._out is None:
            return False
        try:
            sent = self._out.send(data)
        except BlockingIOError:
            return False
        except OSError:
            return False  # the reader or the writer task sees the broken connection
        if sent < len(data):
            self._carry = data[sent:]
            self._call_soon(self._flush_carry)
        return True

    def offer(self, state: Published) -> None:
        """Make ``state`` pending unless a newer one already is. The caller holds ``lock``."""
        if self.pending is None or self.pending.version < state.version:
            self.pending = state

    def wake_writer(self, on_loop: bool) -> None:
        if on_loop:
            self.wake.set()
        else:
            self._call_soon(self.wake.set)

    def _call_soon(self, fn: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass  # the loop is closed: the daemon has stopped serving

    def _flush_carry(self) -> None:
        with self.lock:
            self._write_carry()
            if self.pending is not None:
                self.wake.set()

    def _write_carry(self) -> None:
        data, self._carry = self._carry, None
        if data is not None and not self.closing:
            self.writer.write(data)

    def drop(self, reason: str, *, reply: str | None = None, abort: bool = False) -> None:
        """Close this connection, first sending ``reply`` as an ``error`` line if given."""
        with self.lock:
            if self.reason is None:
                self.reason = reason
            if self._out is not None:
                self._out.close()
                self._out = None
            transport = self.writer.transport
            if transport.is_closing():
                return
            if not abort:
                self._write_carry()  # a line a thread began is finished before the close
                if reply is not None:
                    # The reply may quote what the client sent, which may not be valid text
                    # (a lone surrogate): escaped, so that the error line can be written.
                    text = shown_text(reply[:4096])
                    self.writer.write(protocol.encode(protocol.error(text)))
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
