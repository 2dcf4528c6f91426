"""A daemon that keeps its socket open but reads nothing: the client's outbox stays bounded.

Past ``OUTBOX_MAX_BYTES`` the connection is dropped (with what was queued) and made
again; the new connection starts with a ``hello``, and the daemon's snapshot on it
supersedes what was dropped. Real Unix sockets; the peer simply never reads.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hotknob.model_runtime import connection, protocol
from hotknob.model_runtime.connection import DaemonConnection

# The cap, also for a run against code that had none (there the test must fail on the
# bound, not on a missing name).
CAP = getattr(connection, "OUTBOX_MAX_BYTES", 2 * protocol.MAX_LINE_BYTES)


@pytest.fixture
def listener(sock_path: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(sock_path)
    sock.listen(4)
    sock.setblocking(False)
    yield sock
    sock.close()


def accept(listener: socket.socket, timeout: float = 5.0) -> socket.socket | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            time.sleep(0.005)
            continue
        conn.settimeout(5)
        return conn
    return None


def greet(peer: socket.socket, version: int) -> None:
    """Read the client's ``hello`` and answer with a snapshot; then read nothing more."""
    line = peer.makefile("rb").readline()
    assert protocol.decode(line)["type"] == "hello"
    peer.sendall(protocol.encode(protocol.snapshot(version, version, {"a": 1}, {})))


def flood(conn: DaemonConnection, listener: socket.socket) -> tuple[int, socket.socket | None]:
    """Send until the client reconnects (or well past the cap); the largest outbox seen."""
    message: dict[str, Any] = {"type": "metrics", "step": 1, "pad": "x" * 4000}
    largest = 0
    for _ in range(3 * CAP // 4000):
        conn.send(message)
        largest = max(largest, len(conn._out))
        try:
            peer, _ = listener.accept()
        except BlockingIOError:
            continue
        peer.settimeout(5)
        return largest, peer
    return largest, accept(listener, timeout=2.0)


def test_a_daemon_that_reads_nothing_gets_a_new_connection_not_an_endless_outbox(
    sock_path: str, listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    states: list[int] = []
    conn = DaemonConnection(
        sock_path,
        protocol.hello("flooder"),
        lambda message, is_snapshot: states.append(message["version"]),
        name="hotknob-test-conn",
    )
    peers: list[socket.socket] = []
    caplog.set_level(logging.WARNING, logger="hotknob.model_runtime")
    conn.start()
    try:
        first = accept(listener)
        assert first is not None
        peers.append(first)
        greet(first, 1)
        deadline = time.monotonic() + 5
        while states != [1]:
            assert time.monotonic() < deadline
            time.sleep(0.005)

        for version in (2, 3):  # twice: the warning is said once
            largest, peer = flood(conn, listener)
            assert largest <= CAP, f"the outbox grew to {largest} bytes"
            assert peer is not None, "the client never reconnected"
            peers.append(peer)
            greet(peer, version)  # a fresh hello first: what was queued is gone
            deadline = time.monotonic() + 5
            while states[-1] != version:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert len(conn._out) < CAP
        assert "daemon read nothing" in conn.last_error
        full = [r for r in caplog.records if "live_outbox_full" in r.getMessage()]
        assert len(full) == 1
    finally:
        conn.close()
        for peer in peers:
            peer.close()
