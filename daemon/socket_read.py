"""The reading end of each connection to the daemon's socket: what a client says, read,
checked and acted on.

The server (``socket_server``) sends the states and the events; this is the other way,
a connection's lines: its ``hello`` (the client named, then handed to the server for its
first state, ``admit``), its acks and its metrics (handed to the daemon's callbacks).
It is apart from the server because nothing here is on a state's way out: it only reads
the server's connections (to keep names unique), and asks it for ``admit`` and for
``flush_pending`` (what a connection is owed before the ``error`` line that closes it).

- Turns: a connection's reader hands the loop on after ``READ_SLICE_S`` or
  ``READ_SLICE_LINES`` of lines it already holds, so a client flooding acks or reports
  never holds up the others.
- Errors: a malformed line, an unknown type, a wrong protocol, a message before
  ``hello``, a line over ``protocol.MAX_LINE_BYTES``, invalid UTF-8 or a lone surrogate
  gets an ``error`` line and that connection alone is closed; so does a connection that
  sends no ``hello`` within ``hello_timeout``. An ``applied`` for a version newer than
  any the connection was sent is recorded, and logged once (``applied_unknown_version``):
  the process runs a state this daemon does not know.
- Names: each connected client's ``ClientInfo.name`` is unique. A ``hello`` with a
  name another connection has gets ``<name>-2`` (or the first free number), logged
  as ``client_renamed``; the client is told nothing (the protocol has no field for it).

Log events: ``client_renamed``, ``client_error``, ``applied_unknown_version``,
``callback_failed``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from hotknob.model_runtime import protocol

from .client_log import ClientErrors
from .published import ClientInfo
from .socket_conn import Connection

READ_SLICE_S = 0.005
"""The longest one connection's reader handles lines it already holds before it lets the
loop run others: a line in the buffer is read without a wait, so a client that floods acks
or reports (2 MiB of them buffered: tens of thousands) would hold the loop for a second
(every other client's hello, writer and events, the status and guard timers)."""
READ_SLICE_LINES = 256
"""And the most lines it handles in one turn: a line the daemon has nothing to do for (an
ack repeated) takes microseconds, and thousands of them in one turn would still keep the
others' lines waiting behind them."""

_HELLO_FIELDS = frozenset({"type", "protocol", "client", "pid"})


class ClientReader:
    """Reads the lines of one server's connections, one ``read`` task each; loop thread."""

    def __init__(
        self,
        *,
        hello_timeout: float,
        client_errors: ClientErrors,
        connections: Mapping[int, Connection],
        admit: Callable[[Connection, ClientInfo], None],
        flush_pending: Callable[[Connection], None],
        on_applied: Callable[[ClientInfo, dict[str, Any]], None] | None = None,
        on_metrics: Callable[[ClientInfo, dict[str, Any]], None] | None = None,
    ):
        """``connections``: the server's, as they come and go (a ``hello``'s name is made
        unique among them). ``admit`` gives a client its first state, once its ``hello``
        is taken; ``flush_pending`` writes what a connection is still owed, before the
        ``error`` line that closes it."""
        self._hello_timeout = hello_timeout
        self._client_errors = client_errors
        self._conns = connections
        self._admit = admit
        self._flush_pending = flush_pending
        self._on_applied = on_applied
        self._on_metrics = on_metrics

    async def read(self, conn: Connection) -> None:
        """Handle lines until EOF or an error; a last line without a newline still counts.
        A connection that sends no ``hello`` within ``hello_timeout`` is closed."""
        eof = False
        hello_by = time.monotonic() + self._hello_timeout
        slice_from = time.monotonic()  # ``READ_SLICE_S``: when this reader last yielded
        lines = 0  # ``READ_SLICE_LINES``: handled since then
        while not eof and not conn.closing:
            try:
                if conn.info is None:
                    left = hello_by - time.monotonic()
                    line = await asyncio.wait_for(conn.reader.readuntil(b"\n"), max(left, 0))
                else:
                    line = await conn.reader.readuntil(b"\n")
            except TimeoutError:
                self._reject(conn, f'no "hello" within {self._hello_timeout:g} s')
                return
            except asyncio.IncompleteReadError as exc:
                line, eof = exc.partial, True
            except asyncio.LimitOverrunError:
                self._reject(conn, f"line exceeds the {protocol.MAX_LINE_BYTES}-byte limit")
                return
            except OSError as exc:
                conn.reason = conn.reason or f"read failed: {exc}"
                return
            if conn.closing:
                return
            if line.strip() and not self._handle_line(conn, line):
                return
            lines += 1
            if lines >= READ_SLICE_LINES or time.monotonic() - slice_from >= READ_SLICE_S:
                await asyncio.sleep(0)  # the others' turn; one clock read a line otherwise
                slice_from, lines = time.monotonic(), 0
        conn.reason = conn.reason or "closed"

    def _handle_line(self, conn: Connection, line: bytes) -> bool:
        """Act on one line; False when the connection is to be closed."""
        try:
            message = protocol.decode(line)
            if message["type"] == protocol.ERROR:
                self._client_errors.report(conn.log, error=str(message.get("error")), side="client")
                conn.drop("the client reported an error")
                return False
            protocol.validate_client_message(message, said_hello=conn.info is not None)
        except protocol.ProtocolError as exc:
            self._reject(conn, str(exc))
            return False
        self._dispatch(conn, message)
        return True

    def _reject(self, conn: Connection, reason: str) -> None:
        self._client_errors.report(conn.log, error=reason)
        self._flush_pending(conn)
        conn.drop(f"protocol error: {reason}", reply=reason)

    def _dispatch(self, conn: Connection, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == protocol.HELLO:
            self._accept_hello(conn, message)
            return
        assert conn.info is not None
        if kind == protocol.APPLIED:
            self._note_unknown_version(conn, message["version"])
            run_callback(conn, self._on_applied, conn.info, message)
        elif kind == protocol.METRICS:
            run_callback(conn, self._on_metrics, conn.info, message)

    def _note_unknown_version(self, conn: Connection, version: int) -> None:
        """Log, once per connection (``applied_unknown_version``), an ack of a version
        newer than any this connection was sent (or has waiting: a client may ack the state
        it runs before it reads its snapshot). It is recorded all the same: the process
        runs a state this daemon does not know (a checkpoint's, or one of a daemon before
        a restart that did not keep its versions), which ``status`` shows (that version,
        no revision) and a guard waits on, since the process may still apply the change.
        It is not refused: an ``error`` would close the connection at every reconnect."""
        offered = conn.offered_version()
        if (offered is not None and version <= offered) or conn.said_unknown_version:
            return
        conn.said_unknown_version = True
        conn.log.warning(
            "applied_unknown_version",
            version=version,
            newest_sent=offered,
            detail="a version this connection was never sent: the process runs a state "
            "this daemon does not know; further ones on this connection are not logged",
        )

    def _unique_name(self, requested: str) -> str:
        """``requested``, or if a connected client has it, ``requested-2``, ``-3``... (the
        first free one): what the daemon keeps per client (status entries, metric series,
        guard windows) is keyed by name, and two processes under one name would overwrite
        each other's and the first to leave would take both with it. A ``/`` becomes ``_``
        in a status key, so names equal after that count as the same. Loop thread."""
        taken = {c.info.name.replace("/", "_") for c in self._conns.values() if c.info is not None}
        name, n = requested, 1
        while name.replace("/", "_") in taken:
            n += 1
            name = f"{requested}-{n}"
        return name

    def _accept_hello(self, conn: Connection, message: dict[str, Any]) -> None:
        pid = message.get("pid", conn.peer_pid)
        requested = message.get("client", "")
        name = self._unique_name(requested)
        if name != requested:
            conn.log.info("client_renamed", requested=requested, client=name, pid=pid)
        info = ClientInfo(
            id=conn.id,
            name=name,
            pid=pid,
            uid=conn.uid,
            connected_at=conn.connected_at,
            extra={k: v for k, v in message.items() if k not in _HELLO_FIELDS},
            peer_pid=conn.peer_pid,
        )
        self._admit(conn, info)


def run_callback(conn: Connection, callback: Callable[..., None] | None, *args: Any) -> None:
    """Run one of the daemon's callbacks for ``conn``'s client: an exception in it is
    logged (``callback_failed``), never propagated."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        conn.log.exception("callback_failed", callback=getattr(callback, "__name__", "?"))
