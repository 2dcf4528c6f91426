"""The daemon's Unix-socket server: protocol 1, one writer per client, updates coalesced.

The engine hands over each accepted state as a frozen ``Published`` value, on the
event loop or on the thread that accepted it (the etcd watch thread, for a change
that comes alone: no hand-over to the loop on the way out). ``publish`` never blocks
and never fails because of a client: to a client whose transport holds nothing back
and whose writer is idle it writes the update at once (the fast path: no task
wake-up per client; from another thread, through a duplicate of the socket, see
``socket_conn``); to any other it records the state and wakes that client's writer,
which coalesces.

What is guaranteed:

- Safety of the path: the folder is created 0700 and the socket is 0600 before
  it listens; every peer's uid is checked with ``SO_PEERCRED`` and a uid that is
  not allowed gets an ``error`` and is closed. A stale socket file (nothing
  listening) is replaced; a live daemon's socket is never taken over
  (``SocketInUse``), and anything that is not a socket is never removed. The
  listening end (path, bind, failed accepts, the socket file) is ``socket_listen``.
- Order: ``hello`` first, answered at once by a ``snapshot`` of ``current()``;
  then one ``update`` per state the client has not yet been sent.
- Coalescing: each client has one pending slot and its own writer task. A client
  that reads slowly receives fewer updates, each with ``changed`` computed
  against what *it* was last sent (each line encoded once for the clients at one
  version: ``state_messages``), and always ends on the newest state; it never
  delays other clients. The daemon's memory per client is bounded: the writer
  waits for the transport to drain after each line, a client that takes nothing of it
  for ``drain_timeout`` (one that reads, however slowly, is not stuck) or whose buffer
  passes ``max_write_buffer`` is disconnected.
- Reading: a connection's lines (its turns, its errors, its ``hello`` and the name it
  gets, its acks) are read and acted on by ``socket_read``.
- Resources: a connection costs one file descriptor until its ``hello``, two after
  (``socket_conn``). A process out of descriptors cannot accept: that is one log line
  (``accept_failed``) at most every ``ACCEPT_FAILED_LOG_EVERY_S``, not the loop's
  traceback per attempt, and connections wait in the backlog until descriptors are free.
- Log volume: a ``client_error`` that a client causes (junk, no ``hello``, an ``error``
  line, not reading) is logged at most ``CLIENT_ERRORS_LOGGED`` times every
  ``CLIENT_ERROR_LOG_EVERY_S``; the rest are counted, in one ``client_errors_not_logged``
  line when that time is up: a client that reconnects in a loop sending junk would
  otherwise write a line per connection for as long as it runs (``client_log``).
- Callbacks (``on_applied``, ``on_metrics``, ``on_disconnect``) run in the loop;
  an exception in one is logged (``callback_failed``), never propagated.

Log events: ``socket_listening``, ``stale_socket_removed``, ``client_connected``,
``client_renamed``, ``client_disconnected``, ``client_refused``, ``client_error``,
``applied_unknown_version``, ``accept_failed``, ``callback_failed``, ``event_cut``,
``event_dropped``, ``publish_out_of_order``, ``socket_closed``, ``client_errors_not_logged``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog

from hotknob.model_runtime import protocol

from .client_log import ClientErrors, logged_extra
from .event_fit import fitted_event
from .pending import Sent
from .published import ClientInfo, Published
from .socket_conn import CLOSE_GRACE_S, Connection, Stuck
from .socket_listen import ACCEPT_FAILED_LOG_EVERY_S as ACCEPT_FAILED_LOG_EVERY_S
from .socket_listen import Listener
from .socket_path import SocketInUse, SocketPathError
from .socket_read import READ_SLICE_S as READ_SLICE_S
from .socket_read import ClientReader, run_callback
from .state_messages import StateMessages

__all__ = ["ClientInfo", "Published", "SocketInUse", "SocketPathError", "SocketServer"]

DEFAULT_MAX_WRITE_BUFFER = 4 * 1024 * 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_HELLO_TIMEOUT_S = 30.0
"""How long a connection may stay open without its ``hello``: long enough to type one
into ``socat``; each such connection holds a file descriptor."""
DRAIN_CHECK_S = 1.0
"""While a client is slow to take a line, how often the server looks whether it took any
of it: a client is dropped for taking nothing for ``drain_timeout``, not for being slow."""

_PEERCRED = struct.Struct("3i")


class SocketServer:
    """Serves protocol 1 on a Unix socket; start once, ``close`` idempotently.

    ``publish`` may be called from any thread (publishes are serialized, and a version
    not newer than the last is ignored); ``broadcast_event`` and the ``clients``
    property must be called from the event loop the server was started in.
    """

    def __init__(
        self,
        path: Path,
        current: Callable[[], Published],
        *,
        on_applied: Callable[[ClientInfo, dict[str, Any]], None] | None = None,
        on_metrics: Callable[[ClientInfo, dict[str, Any]], None] | None = None,
        on_disconnect: Callable[[ClientInfo], None] | None = None,
        allowed_uids: frozenset[int] | None = None,
        log: Any = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
        hello_timeout: float | None = None,
        restart_only: Iterable[str] = (),
        secret: Iterable[str] = (),
        app: str | None = None,
    ):
        """``hello_timeout``: ``DEFAULT_HELLO_TIMEOUT_S`` if None, read when the server is
        made (a test's daemon sets it before). ``restart_only`` and ``secret`` (the keys the
        schema keeps secret), and ``app``, are named in each snapshot."""
        self._messages = StateMessages(restart_only, secret, app)
        self._current = current
        self._on_disconnect = on_disconnect
        self._allowed_uids = frozenset({os.getuid()}) if allowed_uids is None else allowed_uids
        self._log = log if log is not None else structlog.get_logger(__name__)
        self._listener = Listener(Path(path), self._log)
        self._max_write_buffer = max_write_buffer
        self._drain_timeout = drain_timeout
        self._conns: dict[int, Connection] = {}
        self._handlers: set[asyncio.Task[Any]] = set()
        self._next_id = 1
        self._last_version: int | None = None
        self._loop_thread: int | None = None
        # Held while a state is published (and while a new client takes its first one):
        # a client registers either before a publish, which then offers it the state,
        # or after, and gets the state from ``current()``.
        self._publish_lock = threading.Lock()
        self._close_task: asyncio.Task[None] | None = None
        self._client_errors = ClientErrors(self._log)
        self._reader = ClientReader(
            hello_timeout=DEFAULT_HELLO_TIMEOUT_S if hello_timeout is None else hello_timeout,
            client_errors=self._client_errors,
            connections=self._conns,
            admit=self._admit,
            flush_pending=self._flush_pending,
            on_applied=on_applied,
            on_metrics=on_metrics,
        )

    @property
    def path(self) -> Path:
        return self._listener.path

    @property
    def clients(self) -> list[ClientInfo]:
        """Every connected client that has said ``hello``, oldest first. Any thread: the
        metrics endpoint reads it while the loop adds and drops connections, so the
        connections are copied in one step (C code, under the interpreter lock) first."""
        return [conn.info for conn in tuple(self._conns.values()) if conn.info is not None]

    def sent(self) -> list[Sent]:
        """The newest state sent to each connected process (not the ``watch`` clients), for
        the looks for states held unapplied (``pending.py``). Any thread, as ``clients``."""
        return [
            Sent(conn.info.name, last.version, last.revision)
            for conn in tuple(self._conns.values())
            if conn.info is not None and not conn.info.watch and (last := conn.last_sent)
        ]

    @property
    def has_watchers(self) -> bool:
        """Whether a ``watch`` client is connected. Any thread (as ``clients``): the watch
        thread asks before it wakes the loop for an event that nobody would get."""
        return any(c.info is not None and c.info.watch for c in tuple(self._conns.values()))

    @property
    def write_buffer_bytes(self) -> int:
        """Bytes the daemon holds for clients right now (transport buffers and queued events)."""
        return sum(
            conn.writer.transport.get_write_buffer_size() + conn.event_bytes
            for conn in tuple(self._conns.values())
        )

    def reserve(self) -> None:
        """Take the path for this server (its lock, held until ``close``; a stale socket
        removed) without listening yet: a daemon does so before it touches anything a
        daemon on this path owns. ``start`` does it if not done. Raises ``SocketInUse``
        or ``SocketPathError``."""
        self._listener.reserve()

    async def start(self) -> None:
        """Listen on the path. Raises ``SocketInUse`` or ``SocketPathError``."""
        if self._listener.listening or self._close_task is not None:
            raise RuntimeError("a SocketServer is started once")
        self._loop_thread = threading.get_ident()
        await self._listener.listen(self._handle)

    def publish(self, new: Published) -> None:
        """Make ``new`` the state every client converges to; a version not newer is ignored.

        Any thread: off the loop, an idle client is written to at once and any other
        gets ``new`` from its writer, woken through the loop."""
        on_loop = self._loop_thread in (None, threading.get_ident())
        with self._publish_lock:
            if self._last_version is not None and new.version <= self._last_version:
                if new.version < self._last_version:
                    self._log.warning(
                        "publish_out_of_order", version=new.version, last_version=self._last_version
                    )
                return
            self._last_version = new.version
            for conn in list(self._conns.values()):
                with conn.lock:
                    if conn.info is None or self._write_now(conn, new, on_loop):
                        continue
                    conn.offer(new)
                conn.wake_writer(on_loop)

    def _write_now(self, conn: Connection, new: Published, on_loop: bool) -> bool:
        """The fast path: write ``new`` at once if nothing is queued for ``conn``, its
        writer is idle and its transport holds nothing back. False: leave it to the
        writer. The caller holds ``conn.lock``."""
        if not conn.idle():
            return False
        if conn.last_sent is not None and new.version <= conn.last_sent.version:
            return True  # its snapshot already had this state (a push held back by the throttle)
        try:
            data = self._messages.message_for(conn.last_sent, new)
        except protocol.ProtocolError:
            return False  # the writer reports it and closes the connection
        if on_loop:
            conn.write(data)
        elif not conn.send_from_thread(data):
            return False
        conn.last_sent = new
        return True

    def broadcast_event(self, event: Mapping[str, Any]) -> None:
        """Send ``event`` (its fields, with ``"type": "event"``) to every ``watch`` client.

        Events are not coalesced: a watcher that lets more than ``max_write_buffer``
        bytes of them queue up is disconnected.
        """
        watching = [c for c in self._conns.values() if c.info is not None and c.info.watch]
        if not watching:
            return
        try:
            data = protocol.encode({**event, "type": protocol.EVENT})
        except protocol.ProtocolError as exc:
            fitted = fitted_event(event)
            if fitted is None:
                self._log.error("event_dropped", error=str(exc))
                return
            data = fitted
            self._log.warning("event_cut", event_name=event.get("event"), error=str(exc))
        for conn in watching:
            if conn.closing:
                continue
            if conn.event_bytes + len(data) > self._max_write_buffer:
                self._client_errors.report(conn.log, error="too slow to take events")
                conn.drop("too slow to take events", abort=True)
                continue
            with conn.lock:
                conn.events.append(data)
                conn.event_bytes += len(data)
            conn.wake.set()

    async def close(self) -> None:
        """Stop listening, remove the socket file, close every client; safe to call twice."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._listener.stop_listening()
        for conn in list(self._conns.values()):
            conn.drop("daemon closing")
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=CLOSE_GRACE_S)
        for conn in list(self._conns.values()):
            conn.writer.transport.abort()  # a client that would not take its last bytes
        if self._handlers:
            _, late = await asyncio.wait(set(self._handlers), timeout=CLOSE_GRACE_S)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._client_errors.flush()
        await self._listener.closed()

    def socket_file(self) -> str:
        """Whether the path still leads to the socket this server bound: ``"ok"``,
        ``"missing"`` (removed: nobody can connect any more) or ``"replaced"`` (another
        file is there now); ``"not_listening"`` before the start and after the close. Any
        thread."""
        if self._close_task is not None:
            return "not_listening"
        return self._listener.socket_file()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except Exception:  # this connection's own fault: one log line, the others go on
            self._log.exception("client_error", error="internal error in the connection")
            writer.transport.abort()
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = self._next_id
        self._next_id += 1
        try:
            raw = writer.get_extra_info("socket").getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
            )
            peer_pid, uid, _gid = _PEERCRED.unpack(raw)
        except OSError as exc:
            self._log.warning("client_refused", client_id=conn_id, reason=f"no credentials: {exc}")
            writer.transport.abort()
            return
        log = self._log.bind(client_id=conn_id, uid=uid, peer_pid=peer_pid)
        conn = Connection(conn_id, reader, writer, uid, peer_pid, log)
        try:
            if uid not in self._allowed_uids:
                conn.log.warning("client_refused", reason="uid not allowed")
                conn.drop("refused", reply=f"uid {uid} may not use this socket")
            elif self._close_task is not None:
                conn.drop("daemon closing")
            else:
                self._conns[conn_id] = conn
                conn.writer_task = asyncio.create_task(self._write_loop(conn))
                await self._reader.read(conn)
        finally:
            await self._finish(conn)

    def _admit(self, conn: Connection, info: ClientInfo) -> None:
        """Make ``conn`` the client ``info`` (its ``hello`` taken) and give it its first
        state, ``current()``. Loop thread."""
        conn.open_side_channel()
        with self._publish_lock:
            try:
                state = self._current()
            except Exception as exc:
                conn.log.exception("client_error", error="current() failed")
                conn.drop("no state to send", reply=f"the daemon has no state to send: {exc}")
                return
            with conn.lock:
                conn.info = info
                conn.offer(state)
        conn.log = conn.log.bind(client=info.name, pid=info.pid)
        conn.log.info("client_connected", **logged_extra(info.extra))
        conn.wake.set()

    async def _write_loop(self, conn: Connection) -> None:
        try:
            while True:
                conn.busy = False
                await conn.wake.wait()
                with conn.lock:
                    conn.busy = True
                    conn.wake.clear()
                while conn.events:
                    with conn.lock:
                        data = conn.events.popleft()
                        conn.event_bytes -= len(data)
                    await self._send(conn, data)
                with conn.lock:
                    target, conn.pending = conn.pending, None
                if target is None:
                    continue
                if conn.last_sent is not None and target.version <= conn.last_sent.version:
                    continue
                data = self._messages.message_for(conn.last_sent, target)
                # Sent before the wait for the client to take it: its ack may come first.
                conn.last_sent = target
                await self._send(conn, data)
        except Stuck as exc:
            self._client_errors.report(conn.log, error=str(exc))
            conn.drop(str(exc), abort=True)
        except protocol.ProtocolError as exc:
            conn.log.error("client_error", error=f"cannot encode the state: {exc}")
            conn.drop("state not encodable", reply=f"the daemon cannot send its state: {exc}")
            await conn.wait_closed()
        except OSError as exc:
            conn.drop(f"write failed: {exc}", abort=True)
        except Exception:
            conn.log.exception("client_error", error="internal error in the writer")
            conn.drop("internal error", abort=True)

    async def _send(self, conn: Connection, data: bytes) -> None:
        transport = conn.writer.transport
        if transport.is_closing():
            raise ConnectionResetError("connection closing")
        if transport.get_write_buffer_size() > self._max_write_buffer:
            raise Stuck(f"not reading: over {self._max_write_buffer} bytes waiting")
        conn.write(data)
        left = transport.get_write_buffer_size()
        took_at = time.monotonic()
        while left:
            wait = took_at + self._drain_timeout - time.monotonic()
            if wait <= 0:
                raise Stuck(f"not reading: took nothing for {self._drain_timeout:g} s")
            try:
                await asyncio.wait_for(conn.writer.drain(), min(wait, DRAIN_CHECK_S))
                return
            except TimeoutError:
                now_left = transport.get_write_buffer_size()
                if now_left < left:  # it reads, however slowly
                    left, took_at = now_left, time.monotonic()

    async def _finish(self, conn: Connection) -> None:
        self._conns.pop(conn.id, None)
        task = conn.writer_task
        # Cancelled again until it ends: a cancel that lands as the drain it waits on
        # completes can be lost (``asyncio.wait_for`` before Python 3.12 then returns the
        # drain's result), and the writer would wait on for a wake-up that never comes.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if conn.reason == "closed":
            self._flush_pending(conn)
        conn.drop(conn.reason or "closed")
        await conn.wait_closed()
        if conn.info is not None:
            conn.log.info("client_disconnected", reason=conn.reason or "closed")
            # A process that reconnected at once has its name again (this connection had
            # left ``_conns`` before the close was awaited): what is kept under that name
            # (status entry, metric series, guard windows) is now the new connection's.
            name = conn.info.name
            if not any(c.info is not None and c.info.name == name for c in self._conns.values()):
                run_callback(conn, self._on_disconnect, conn.info)

    def _flush_pending(self, conn: Connection) -> None:
        """Before an orderly close, send what is still pending: ``echo hello | socat`` gets
        its snapshot, and an error line comes after the states it follows. The close that
        follows flushes it, within ``CLOSE_GRACE_S``."""
        with conn.lock:
            target = conn.pending
            if target is None or conn.closing:
                return
            if conn.last_sent is not None and target.version <= conn.last_sent.version:
                return
            with contextlib.suppress(protocol.ProtocolError):
                conn.write(self._messages.message_for(conn.last_sent, target))
