"""The listening end of the daemon's socket: the path taken, bound, listened on, and given
back.

The server (``socket_server``) serves the connections; this holds what is about the socket
file and the listening socket alone, which nothing on a connection's way touches: the
path's lock (held from ``reserve`` until the close), a stale socket removed, the bind and
its mode (0600 before anyone can connect), the loop's exception handler that turns a
failed ``accept`` into one ``accept_failed`` line now and then, whether the path still
leads to the socket it bound, and removing that socket file (only that one) at the close.

Log events: ``socket_listening``, ``stale_socket_removed``, ``accept_failed``,
``socket_closed``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hotknob.model_runtime import protocol

from .socket_path import (
    SocketInUse,
    SocketPathError,
    clear_stale_socket,
    lock_socket_path,
    prepare_folder,
)

ACCEPT_FAILED_LOG_EVERY_S = 10.0


def _retries_serving(context: dict[str, Any]) -> bool:
    """Whether the loop's report is of its own retry to serve a listening socket (it
    names no socket then, only the callback)."""
    return "_start_serving" in str(context.get("message", ""))


class Listener:
    """The socket file and the listening socket of one server; ``listen`` once."""

    def __init__(self, path: Path, log: Any):
        self.path = path
        self._log = log
        self._server: asyncio.AbstractServer | None = None
        self._listening_fd: int | None = None
        self._loop_handler: Any = None  # the loop's exception handler before ``listen``
        self._accept_failures = 0  # since ``accept_failed`` was last logged
        self._accept_ever_failed = False
        self._accept_failed_at = float("-inf")
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file
        self._lock_fd: int | None = None
        self._reserved = False

    @property
    def listening(self) -> bool:
        """Whether ``listen`` succeeded (it stays so after the close)."""
        return self._server is not None

    def reserve(self) -> None:
        """Take the path (its lock, held until ``closed``; a stale socket removed). Raises
        ``SocketInUse`` or ``SocketPathError``."""
        if self._reserved:
            return
        # Before anything is made or read: a path no socket can have would otherwise fail
        # only at the bind, after the start read etcd and wrote the state file.
        too_long = protocol.socket_path_problem(str(self.path))
        if too_long is not None:
            raise SocketPathError(too_long)
        prepare_folder(self.path.parent)
        self._lock_fd = lock_socket_path(self.path)
        try:
            if clear_stale_socket(self.path):
                self._log.info("stale_socket_removed", path=str(self.path))
        except BaseException:
            self._release_lock()
            raise
        self._reserved = True

    async def listen(
        self, handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> None:
        """Reserve the path if not done, bind it and listen, each connection to ``handle``.
        Raises ``SocketInUse`` or ``SocketPathError``."""
        self.reserve()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.bind(str(self.path))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise SocketInUse(f"{self.path}: another daemon took it just now") from exc
                raise SocketPathError(f"cannot bind {self.path}: {exc}") from exc
            st = os.stat(self.path)
            self._bound = (st.st_dev, st.st_ino)
            # Not yet listening: nobody can connect before the mode is 0600.
            os.chmod(self.path, 0o600)
            self._server = await asyncio.start_unix_server(
                handle, sock=sock, limit=protocol.MAX_LINE_BYTES - 1
            )
        except BaseException:
            sock.close()
            self._remove_socket_file()
            self._release_lock()
            raise
        loop = asyncio.get_running_loop()
        self._listening_fd = sock.fileno()
        self._loop_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_exception)
        self._log.info("socket_listening", path=str(self.path))

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's exception handler while the server listens. A failed ``accept`` on
        this server's socket (the process is out of file descriptors, or the system out of
        memory) is said in one line, ``accept_failed``: the loop reports each failure with
        a traceback and tries again many times a second, which would bury the log. After
        such a failure the loop also retries a moment later (``_start_serving``), even
        once the server is closed, where the retry fails on the closed socket: that is
        dropped. What else the loop reports goes where it went before."""
        sock = context.get("socket")
        exc = context.get("exception")
        fd = self._listening_fd
        if fd is not None and isinstance(exc, OSError) and sock is not None and sock.fileno() == fd:
            self._accept_failed(exc)
        elif fd is None and self._accept_ever_failed and _retries_serving(context):
            self._log.debug("accept_retry_after_close", error=str(exc))
        elif self._loop_handler is not None:
            self._loop_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    def _accept_failed(self, exc: OSError) -> None:
        """Log ``accept_failed`` at most every ``ACCEPT_FAILED_LOG_EVERY_S``, with how many
        accepts failed since the last line (this one's included)."""
        self._accept_failures += 1
        self._accept_ever_failed = True
        now = time.monotonic()
        if now - self._accept_failed_at < ACCEPT_FAILED_LOG_EVERY_S:
            return
        self._log.error(
            "accept_failed",
            error=exc.strerror or str(exc),
            failures=self._accept_failures,
            detail="new connections wait until descriptors are free: raise the daemon's "
            "limit (ulimit -n), or find what holds connections to the socket open",
        )
        self._accept_failures = 0
        self._accept_failed_at = now

    def stop_listening(self) -> None:
        """Accept no more connections and remove the socket file; those accepted go on."""
        if self._server is not None:
            self._server.close()
            self._remove_socket_file()
            # The handler stays: a retry of a failed accept may still be due (see it).
            self._listening_fd = None

    async def closed(self) -> None:
        """Once the connections are closed: wait for the server's close, give the path back."""
        if self._server is not None:
            await self._server.wait_closed()
            self._log.info("socket_closed", path=str(self.path))
        self._release_lock()

    def socket_file(self) -> str:
        """Whether the path still leads to the socket this bound: ``"ok"``, ``"missing"``
        or ``"replaced"``; ``"not_listening"`` before ``listen``. Any thread."""
        bound = self._bound
        if bound is None or self._server is None:
            return "not_listening"
        try:
            st = os.stat(self.path)
        except OSError:  # removed, or a folder on the way is gone or closed to us
            return "missing"
        return "ok" if (st.st_dev, st.st_ino) == bound else "replaced"

    def _release_lock(self) -> None:
        self._reserved = False
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # the lock goes with it

    def _remove_socket_file(self) -> None:
        """Unlink the socket only if it is still the one this server bound."""
        try:
            st = os.lstat(self.path)
            if self._bound is not None and (st.st_dev, st.st_ino) == self._bound:
                self.path.unlink()
        except FileNotFoundError:
            pass
