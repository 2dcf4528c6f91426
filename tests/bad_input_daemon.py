"""A real ``hotknob run`` on a real etcd for the bad-input tests, and a raw socket exchange.

``LiveSetup`` starts the etcd, the daemon, a live client whose training loop
validates every state it applies, and an observer that reads the raw messages;
``exchange`` sends bytes on a fresh connection and returns what the daemon answered
before closing it. Apart from ``tests/test_bad_input.py``, which feeds them.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.model_runtime import LiveConfig
from tests.bad_inputs import APP, assert_deliverable
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer
from tests.live_trainer import Trainer


class LiveSetup:
    def __init__(self, folder: Path):
        self.etcd = EtcdServer("bad-input")
        self.daemon = DaemonProcess(
            folder, app=APP, endpoints=self.etcd.endpoint, extra=["--etcd-timeout", "2"]
        )
        self.store: EtcdStore | None = None
        self.live: LiveConfig | None = None
        self.trainer: Trainer | None = None
        self.watcher: RawClient | None = None

    def start(self) -> LiveSetup:
        self.etcd.start()
        self.daemon.start()
        self.store = EtcdStore(EtcdOptions(endpoints=(self.etcd.endpoint,), timeout=5))
        self.live = LiveConfig.connect(socket=self.daemon.socket_path, timeout=10, client="t")
        self.trainer = Trainer(self.live).start()
        self.watcher = RawClient(self.daemon.socket_path, name="observer")
        return self

    def close(self) -> None:
        for closer in (self.trainer and self.trainer.stop, self.live and self.live.close):
            if closer:
                closer()
        if self.watcher is not None:
            self.watcher.close()
        if self.store is not None:
            self.store.close()
        self.daemon.stop()
        self.etcd.close()

    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def received(self) -> list[dict[str, Any]]:
        """Every message the observer has been sent so far (it reads only when asked)."""
        assert self.watcher is not None
        out = []
        while not self.watcher.no_message(0.05):
            out.append(self.watcher.next())
        return out


def exchange(path: Path, data: bytes, *, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send ``data`` on a fresh connection, read until the daemon closes it; the lines it sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # EOF: a last line without a newline still counts
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon closed mid-send (an over-long line): its reply is still readable
        received = b""
        try:
            while chunk := sock.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
    return [json.loads(line) for line in received.splitlines() if line.strip()]


def assert_error_then_closed(replies: list[dict[str, Any]], fragment: str = "") -> None:
    assert replies and replies[-1]["type"] == "error", replies
    assert fragment in replies[-1]["error"], replies[-1]
    for reply in replies[:-1]:
        assert reply["type"] == "snapshot"
        assert_deliverable(reply["values"])
