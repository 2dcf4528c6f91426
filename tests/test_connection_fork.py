"""A process that forks (a DataLoader worker with the ``fork`` start method) while connected.

The child inherits the socket and the wake pipe but not the connection's thread: it
must not keep the daemon's connection open after the parent closes it, nor write into
the parent's stream. Real forks, real Unix sockets; the child reports through a pipe.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest

from hotknob.model_runtime import LiveConfig, protocol
from hotknob.model_runtime.connection import DaemonConnection

from .daemon_stub import DaemonStub

BASE: dict[str, Any] = {"train": {"lr": 0.001}}


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def read_all(fd: int, timeout: float = 10.0) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "the child reported nothing in time"
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(data)
        data += chunk


def fork_child(body: Callable[[], Mapping[str, Any]]) -> tuple[int, dict[str, Any], int]:
    """Fork; the child runs ``body``, writes its result as JSON, then waits until the parent
    writes to the returned fd (so that it is alive meanwhile) and exits."""
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(report_r)
            os.close(go_w)
            try:
                result = dict(body())
            except BaseException as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(report_w, json.dumps(result).encode())
            os.close(report_w)
            os.read(go_r, 1)
            status = 0
        finally:
            os._exit(status)
    os.close(report_w)
    os.close(go_r)
    try:
        result = json.loads(read_all(report_r))
    except BaseException:  # a child that hangs (the failure looked for) must not outlive it
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(go_w)
        raise
    finally:
        os.close(report_r)
    return pid, result, go_w


def end_child(pid: int, go_w: int) -> None:
    os.write(go_w, b"x")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class Server:
    """The daemon's end of one accepted connection, read line by line."""

    def __init__(self, listener: socket.socket) -> None:
        listener.settimeout(5)
        self.sock, _ = listener.accept()
        self.sock.settimeout(5)
        self.reader = self.sock.makefile("rb")

    def message(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line, "EOF where a message was due"
        return protocol.decode(line)

    def send(self, message: Mapping[str, Any]) -> None:
        self.sock.sendall(protocol.encode(message))

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def listener(sock_path: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(sock_path)
    sock.listen(4)
    yield sock
    sock.close()


def test_a_forked_child_closes_its_copy_and_never_writes_to_the_parents_stream(
    sock_path: str, listener: socket.socket
) -> None:
    states: list[tuple[dict[str, Any], bool]] = []
    conn = DaemonConnection(
        sock_path,
        protocol.hello("parent"),
        lambda message, is_snapshot: states.append((dict(message), is_snapshot)),
        name="hotknob-test-conn",
    )
    conn.start()
    server = Server(listener)
    try:
        assert server.message()["type"] == "hello"
        server.send(protocol.snapshot(1, 10, {"train": {"lr": 0.1}}, {}))
        eventually(lambda: len(states) == 1)
        assert conn._sock is not None
        inherited = [conn._sock.fileno(), conn._wake_r, conn._wake_w]

        def in_child() -> dict[str, Any]:
            forked = getattr(conn, "forked", False)
            conn.send({"type": "metrics", "step": 1, "latest": {"from_child": 1.0}})
            conn.close()  # must neither hang (no thread here) nor touch the parent's socket
            return {"forked": forked, "open": [fd for fd in inherited if fd_is_open(fd)]}

        pid, child, go_w = fork_child(in_child)
        try:
            assert child == {"forked": True, "open": []}
            assert not conn.forked

            # The parent's connection is whole: its next line is the first the daemon
            # reads (nothing of the child's came before it), and updates still arrive.
            conn.send({"type": "metrics", "step": 2, "latest": {"from_parent": 1.0}})
            assert server.message()["latest"] == {"from_parent": 1.0}
            server.send(protocol.update(2, 11, {"train.lr": 0.2}, {"train": {"lr": 0.2}}))
            eventually(lambda: len(states) == 2)
            assert states[1][0]["version"] == 2

            # The parent closes while the child lives on: the daemon sees EOF now.
            conn.close()
            assert server.sock.recv(65536) == b""
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child is still alive"
        finally:
            end_child(pid, go_w)
    finally:
        conn.close()
        server.close()


@contextmanager
def pending_change(sock_path: str) -> Iterator[tuple[DaemonStub, LiveConfig, int]]:
    """A ``LiveConfig`` of a stub daemon that applied version 7, and the version of a
    change it has received and not applied yet (train.lr 0.5); closed at the end."""
    with DaemonStub(sock_path, BASE, version=7) as stub:
        live = LiveConfig.connect(sock_path, timeout=5, client="trainer")
        try:
            stub.wait_for(lambda: [m["version"] for m in stub.messages("applied")] == [7])
            version = stub.push({"train": {"lr": 0.5}})
            eventually(lambda: live.pending_version == version)
            yield stub, live, version
        finally:
            live.close()


def test_a_child_forked_from_a_live_config_leaves_the_daemon_to_the_parent(
    sock_path: str,
) -> None:
    with pending_change(sock_path) as (stub, live, version):

        def in_child() -> dict[str, Any]:
            applied = live.apply(5)  # acks, on a closed connection: nothing is sent
            lr = live["train.lr"]
            live.close()
            return {"applied": applied, "lr": lr}

        pid, child, go_w = fork_child(in_child)
        try:
            assert child == {"applied": True, "lr": 0.5}
            assert live.apply(9)
            stub.wait_for(lambda: len(stub.messages("applied")) == 2)
            time.sleep(0.1)
            acks = [(m["version"], m["step"]) for m in stub.messages("applied")]
            assert acks == [(7, 0), (version, 9)], "the child's ack must not reach the daemon"
            assert stub.connections == 1
            live.close()
            stub.wait_for(lambda: stub.connections == 0)  # while the child is alive
            assert os.waitpid(pid, os.WNOHANG) == (0, 0)
        finally:
            end_child(pid, go_w)


def test_a_forked_live_config_does_not_hang_on_a_held_lock_and_keeps_no_reports(
    sock_path: str,
) -> None:
    """A thread of the parent holds the LiveConfig's lock at the fork (its connection thread
    does, while it takes a state in): the child's ``apply`` must not wait for it for ever,
    and its reports, which no thread sends there, must not pile up."""
    with DaemonStub(sock_path, BASE, version=7) as stub:
        live = LiveConfig.connect(sock_path, timeout=5, client="trainer")
        try:
            stub.wait_for(lambda: [m["version"] for m in stub.messages("applied")] == [7])
            report = live.report  # a reference kept before the fork, as a loop would
            report(1, loss=1.0)
            version = stub.push({"train": {"lr": 0.5}})
            eventually(lambda: live.pending_version == version)

            def in_child() -> dict[str, Any]:
                applied = live.apply(5)
                report(2, loss=2.0)
                live.report(3, loss=3.0)
                return {
                    "forked": live.forked,
                    "applied": applied,
                    "kept": {k: list(v) for k, v in live._reporter._buffers.items()},
                }

            # Held by this thread at the fork: the LiveConfig's lock, and that of its
            # first-state event (the connection thread takes both as a state comes in).
            with live._lock, live._first_state._cond:
                pid, child, go_w = fork_child(in_child)
            try:
                assert child == {"forked": True, "applied": True, "kept": {}}
                assert not live.forked
            finally:
                end_child(pid, go_w)
        finally:
            live.close()


def test_forking_while_the_thread_reconnects_never_hangs(sock_path: str) -> None:
    """A fork waits while the thread makes a socket and stores it (no daemon: it retries)."""
    conn = DaemonConnection(
        sock_path, protocol.hello("nobody"), lambda m, s: None, name="hotknob-test-conn"
    )
    conn.start()
    try:
        for _ in range(20):
            pid, child, go_w = fork_child(
                lambda: {"forked": getattr(conn, "forked", False), "closed": conn._closed}
            )
            end_child(pid, go_w)
            assert child == {"forked": True, "closed": True}
            time.sleep(0.01)
    finally:
        conn.close()


def test_a_forked_child_that_applies_is_told_once_that_no_change_comes(
    sock_path: str,
) -> None:
    """The review's case: a DataLoader worker or a pre-fork server's worker that inherited
    the connection and calls ``apply`` for changes got ``False`` for ever, silently."""
    with pending_change(sock_path) as (_, live, _):

        def in_child() -> dict[str, Any]:
            said: list[str] = []
            handler = logging.Handler()
            handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
            logging.getLogger("hotknob.model_runtime").addHandler(handler)
            first = live.apply(5)  # the state held at the fork: still applied
            later = [live.apply(6), live.apply(7)]
            return {"first": first, "later": later, "lr": live["train.lr"], "said": said}

        pid, child, go_w = fork_child(in_child)
        try:
            forked = [m for m in child["said"] if m.startswith("live_config_forked")]
            assert len(forked) == 1, child["said"]
            assert f"pid={pid} client=trainer" in forked[0]
            assert "connect in this process" in forked[0]
            assert child["first"] is True and child["later"] == [False, False]
            assert child["lr"] == 0.5
        finally:
            end_child(pid, go_w)

        # The parent's apply says nothing of it, and its object was not changed.
        assert "apply" not in vars(live)
        assert live.apply(9)
