"""A small, real protocol-1 server on a Unix socket, for testing the runtime client.

It is not the daemon: no layers, no validation, no etcd. It answers ``hello``
with a snapshot of its current state, pushes updates on request, and records
every message clients send. ``stop()`` closes every connection and removes the
socket; ``start()`` may then listen again on the same path, as a restarted
daemon would.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from hotknob.model_runtime import protocol


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class DaemonStub:
    def __init__(
        self,
        path: str | os.PathLike[str],
        values: Mapping[str, Any],
        *,
        version: int = 1,
        restart_only: tuple[str, ...] = (),
        secret: tuple[str, ...] = (),
        app: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.app = app  # named in each snapshot, as a daemon names its app
        self.restart_only = restart_only  # named in each snapshot
        self.secret = secret  # likewise: those of them a process must not log
        self.values: dict[str, Any] = dict(values)
        self.version = version
        self.revision = 100
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, bytearray] = {}
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> DaemonStub:
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        listener.setblocking(False)
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="daemon-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        assert self._wake_w is not None
        self._wake_w.send(b"x")
        self._thread.join()
        self._thread = None
        with self._lock:
            for conn in self._clients:
                conn.close()
            self._clients.clear()
        for own in (self._listener, self._wake_r, self._wake_w):
            if own is not None:
                own.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self) -> DaemonStub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what the tests drive ----------------------------------------------------------

    def push(self, values: Mapping[str, Any]) -> int:
        """Make ``values`` the new state under the next version and send it to every client."""
        with self._lock:
            old = _flat(self.values)
            self.values = dict(values)
            self.version += 1
            self.revision += 1
            changed = {k: v for k, v in _flat(self.values).items() if old.get(k) != v}
            line = protocol.encode(
                protocol.update(self.version, self.revision, changed, self.values)
            )
            for sock in list(self._clients):
                sock.sendall(line)
            return self.version

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            for sock in list(self._clients):
                sock.sendall(data)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._clients)

    def messages(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.received if m["type"] == kind]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            time.sleep(0.005)

    # -- the server thread -------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    sock = key.fileobj
                    if sock is self._listener:
                        conn, _ = self._listener.accept()
                        conn.setblocking(True)
                        with self._lock:
                            self._clients[conn] = bytearray()
                        sel.register(conn, selectors.EVENT_READ)
                    elif sock is not self._wake_r:
                        assert isinstance(sock, socket.socket)
                        self._read(sel, sock)

    def _read(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            sel.unregister(sock)
            with self._lock:
                self._clients.pop(sock, None)
            sock.close()
            return
        with self._lock:
            buf = self._clients[sock]
            buf += data
            while (end := buf.find(b"\n")) >= 0:
                message = protocol.decode(bytes(buf[: end + 1]))
                del buf[: end + 1]
                self.received.append(message)
                if message["type"] == protocol.HELLO:
                    sources = dict.fromkeys(_flat(self.values), "stub")
                    snap = protocol.snapshot(
                        self.version,
                        self.revision,
                        self.values,
                        sources,
                        self.restart_only,
                        self.secret,
                        self.app,
                    )
                    sock.sendall(protocol.encode(snap))
