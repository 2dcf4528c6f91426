"""The socket to the daemon, owned by one background thread.

``DaemonConnection`` says ``hello``, hands every ``snapshot`` and ``update`` to
its ``on_state`` callback, and writes what ``send`` could not. After the daemon
goes away it reconnects with capped, jittered backoff and says ``hello`` again
(the daemon answers with a fresh snapshot). It never touches a binding, a callback
of the user, or torch. The training thread never waits on the socket: ``send``
(an ``applied`` ack, in ``apply``) writes without blocking, and what the socket
does not take at once is left to the thread. Writing the ack there, rather than
waking the thread to write it, keeps ``apply`` from handing the interpreter lock
to that thread in the middle of a step (docs/performance-history.md). A malformed message
from the daemon is answered with ``error``, as the protocol asks of either end; then
the connection closes and is made again.

What waits to be written is capped (``OUTBOX_MAX_BYTES``): a daemon that keeps its
socket open but stops reading has the connection dropped and made again, rather
than the training process's memory growing without end.

A forked child (a DataLoader worker with the ``fork`` start method) inherits the
socket and this module's pipe but not the thread. An at-fork hook closes the
child's copies (the parent's connection stays as it was: closing an inherited fd
closes only the child's), makes the locks new, and marks the connection closed and
``forked``: ``send`` there does nothing, so it never writes into the parent's
stream. The child does not reconnect by itself (16 workers would be 16 more clients).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import protocol
from .finding import DAEMON_SAID

if TYPE_CHECKING:
    import selectors as _selectors
    import socket as _socket

log = logging.getLogger("hotknob.model_runtime")

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0
_CONNECT_TIMEOUT = 1.0
OUTBOX_MAX_BYTES = 2 * protocol.MAX_LINE_BYTES
"""The most bytes ``send`` leaves for the thread to write. A daemon that reads keeps the
outbox near one message; two of the largest lines the protocol allows leave room for a
whole one behind a half-written one. Past it the connection is dropped: the daemon's
snapshot after the reconnect supersedes everything queued (``LiveConfig`` acks it again)."""

StateCallback = Callable[[Mapping[str, Any], bool], None]
"""``on_state(message, is_snapshot)``; may raise ``ProtocolError`` to drop the connection."""


class DaemonConnection:
    """One client connection to a daemon's socket, kept up until ``close``.

    ``start`` launches the thread; ``close`` stops and joins it (idempotent).
    ``send`` may be called from any thread and never blocks; messages sent while
    disconnected are dropped, because the daemon's fresh snapshot supersedes them.
    In a forked child the connection is closed and ``forked`` is True (see the module).
    """

    def __init__(
        self, path: str, hello: Mapping[str, Any], on_state: StateCallback, *, name: str
    ) -> None:
        self.path = path
        self._hello = dict(hello)
        self._on_state = on_state
        self._stop = threading.Event()
        # ``send`` writes straight to the socket when nothing is waiting to go out: no
        # wake-up of this connection's thread in the training step. What the socket does
        # not take goes to ``_out``, which the thread writes; both under ``_send_lock``.
        self._send_lock = threading.Lock()
        self._sock: _socket.socket | None = None
        self._out = bytearray()
        self.last_error = ""
        self._daemon_said = ""  # the daemon's ``error`` on the current connection, if any
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._forked = False
        self._warned_forked = False
        self._warned_full = False
        # The socket and selector of the thread, kept where the at-fork hook finds them;
        # each is made and stored under ``_fd_lock``, which a fork waits for.
        self._fd_lock = threading.Lock()
        self._attempt_sock: _socket.socket | None = None
        self._selector: _selectors.BaseSelector | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        with _live_lock:
            _live.add(self)

    @property
    def forked(self) -> bool:
        """True in a process forked from the one that made this connection: there it is
        closed, and the values it delivered stay as they were at the fork."""
        return self._forked

    def start(self) -> None:
        self._thread.start()

    def send(self, message: Mapping[str, Any]) -> None:
        """Send ``message`` now if the socket takes it, else queue it for the thread; never
        blocks. Dropped while disconnected: the next snapshot supersedes it."""
        if self._closed:
            self._not_sent(message.get("type"))
            return
        try:
            data = protocol.encode(message)
        except protocol.ProtocolError:
            log.exception("live_message_unencodable type=%s", message.get("type"))
            return
        self.send_line(data, message.get("type"))

    def send_line(self, data: bytes, kind: object) -> None:
        """``send`` for a message already encoded (``kind``: its type, for the log)."""
        if self._closed:
            self._not_sent(kind)
            return
        with self._send_lock:
            sock = self._sock
            if sock is None:
                return
            if not self._out:
                try:
                    sent = sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return  # the thread sees the broken connection and reconnects
                if sent == len(data):
                    return
                data = data[sent:]
            if len(self._out) + len(data) > OUTBOX_MAX_BYTES:
                # The daemon is not reading: drop this connection (the thread sees
                # ``_sock`` changed), with what is queued; the reconnect's snapshot
                # supersedes it all.
                self._sock = None
                self._out = bytearray()
                self._wake()
                return
            self._out += data
            self._wake()  # the thread writes the rest; under the lock: ``close`` closes the pipe

    def _not_sent(self, kind: object) -> None:
        if self._forked and not self._warned_forked:
            self._warned_forked = True
            log.warning(
                "live_forked_child path=%s pid=%d: this process was forked from the one "
                "that connected; its connection is closed and %s is not sent",
                self.path,
                os.getpid(),
                kind,
            )

    def close(self) -> None:
        """Stop and join the thread and close the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join()
        with self._send_lock:  # a ``send`` on another thread must not write to a closed fd
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1  # first: a child forked meanwhile closes neither
            os.close(wake_r)
            os.close(wake_w)
        with _live_lock:  # only now: a child forked before this closes the socket it got
            _live.discard(self)

    def _wake(self) -> None:
        if self._wake_w < 0:  # closed
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # a full pipe already wakes the thread
            pass

    def _run(self) -> None:
        # Imported here, on the connection's thread: ``import hotknob.model_runtime`` stays
        # cheap for processes that never connect.
        import random
        import socket as _socket

        delay = _BACKOFF_MIN
        connected_before = False
        while not self._stop.is_set():
            try:
                with self._fd_lock:
                    sock = self._attempt_sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                try:
                    sock.settimeout(_CONNECT_TIMEOUT)
                    sock.connect(self.path)
                    if connected_before:
                        log.info("live_reconnected path=%s", self.path)
                    connected_before = True
                    if self._serve(sock):
                        delay = _BACKOFF_MIN
                    if not self._stop.is_set():
                        log.warning(
                            "live_disconnected path=%s error=%s", self.path, self.last_error
                        )
                finally:
                    sock.close()  # before forgetting it: a fork in between closes it again
                    self._attempt_sock = None
            except OSError as exc:
                self.last_error = exc.strerror or str(exc)
            except Exception as exc:  # the thread must outlive any surprise
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("live_client_error path=%s", self.path)
            if self._stop.wait(delay * random.uniform(0.5, 1.0)):
                break
            delay = min(delay * 2, _BACKOFF_MAX)

    def _serve(self, sock: _socket.socket) -> bool:
        """Talk on one connection until EOF, an error or ``close``; True if a state came."""
        import selectors

        sock.setblocking(False)
        with self._send_lock:  # the hello goes first; acks of an earlier connection are gone
            self._out = bytearray(protocol.encode(self._hello))
            self._sock = sock
        inbuf = bytearray()
        got_state = False
        self._daemon_said = ""
        with self._fd_lock:
            sel = self._selector = selectors.DefaultSelector()
        try:
            interest = selectors.EVENT_READ | selectors.EVENT_WRITE
            sel.register(sock, interest)
            sel.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    if self._sock is not sock:  # ``send`` dropped it: the outbox was full
                        self._drop_full()
                        return got_state
                    wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
                    if wanted != interest:  # a system call: only when it changes
                        sel.modify(sock, wanted)
                        interest = wanted
                    for key, mask in sel.select():
                        if key.fileobj == self._wake_r:
                            self._drain_wake()
                            continue
                        if mask & selectors.EVENT_WRITE:
                            with self._send_lock:
                                del self._out[: sock.send(self._out)]
                        if mask & selectors.EVENT_READ:
                            data = sock.recv(65536)
                            if not data:  # why, if the daemon said (a refused hello)
                                said = self._daemon_said
                                self.last_error = said or "the daemon closed the connection"
                                return got_state
                            inbuf += data
                            got_state |= self._read_lines(inbuf)
            except OSError as exc:
                self.last_error = exc.strerror or str(exc)
            except protocol.ProtocolError as exc:
                self.last_error = f"protocol error: {exc}"
                self._say_error(sock, str(exc))
            finally:
                with self._send_lock:
                    self._sock = None
                    self._out = bytearray()
        finally:
            sel.close()  # before forgetting it: a fork in between closes it again
            self._selector = None
        return got_state

    def _drop_full(self) -> None:
        self.last_error = (
            f"the daemon read nothing while {OUTBOX_MAX_BYTES} bytes waited to be sent"
        )
        if not self._warned_full:
            self._warned_full = True
            log.warning(
                "live_outbox_full path=%s limit_bytes=%d: the daemon is not reading; "
                "reconnecting (what was queued is dropped, the new snapshot supersedes it)",
                self.path,
                OUTBOX_MAX_BYTES,
            )

    def _say_error(self, sock: _socket.socket, text: str) -> None:
        """Tell the daemon why this connection is closing (best effort, never blocks)."""
        with self._send_lock:
            if self._out:  # a line may be half written: an error now would garble it
                return
            try:
                sock.send(protocol.encode(protocol.error(text[:1000])))
            except (OSError, protocol.ProtocolError):
                pass  # the connection closes anyway

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _read_lines(self, inbuf: bytearray) -> bool:
        got_state = False
        while (end := inbuf.find(b"\n")) >= 0:
            line = bytes(inbuf[: end + 1])
            del inbuf[: end + 1]
            message = protocol.decode(line)
            kind = message["type"]
            if kind in (protocol.SNAPSHOT, protocol.UPDATE):
                self._on_state(message, kind == protocol.SNAPSHOT)
                got_state = True
            elif kind == protocol.ERROR:
                self.last_error = self._daemon_said = f"{DAEMON_SAID}{message.get('error')}"
                log.warning("live_daemon_error path=%s error=%s", self.path, message.get("error"))
        if len(inbuf) >= protocol.MAX_LINE_BYTES:
            raise protocol.ProtocolError("line exceeds the size limit")
        return got_state

    def _after_fork_in_child(self) -> None:
        """In a forked child: close the inherited fds and mark this connection closed.

        The parent's connection stays open (an fd closed here is the child's copy), and
        nothing is logged: another thread may have held a logging lock at the fork.
        """
        self._forked = True
        self._closed = True
        self._send_lock = threading.Lock()
        self._fd_lock = threading.Lock()
        self._stop = threading.Event()
        self._stop.set()
        self._sock = None
        self._out = bytearray()
        for own in (self._attempt_sock, self._selector):
            if own is not None:
                try:
                    own.close()
                except (OSError, ValueError):  # already closed
                    pass
        self._attempt_sock = self._selector = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1


# Every connection not yet closed, for the at-fork hooks. A fork waits (``_before_fork``)
# until no connection's thread is between making a socket and storing it, so that the
# child finds every fd it inherited.
_live: weakref.WeakSet[DaemonConnection] = weakref.WeakSet()
_live_lock = threading.Lock()
_forking: list[DaemonConnection] = []


def _before_fork() -> None:
    global _forking
    _live_lock.acquire()
    _forking = list(_live)
    for conn in _forking:
        conn._fd_lock.acquire()


def _after_fork_in_parent() -> None:
    global _forking
    for conn in _forking:
        conn._fd_lock.release()
    _forking = []
    _live_lock.release()


def _after_fork_in_child() -> None:
    global _forking, _live_lock, _live
    _live_lock = threading.Lock()
    for conn in _forking:
        conn._after_fork_in_child()
    _live = weakref.WeakSet()
    _forking = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
