"""The socket protocol against clients that misbehave, and the metrics that follow changes.

Real daemons (``tests/daemon_proc.py``) and real etcd where the daemon's whole path
matters; the socket server alone, on real Unix sockets, where the decision is its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, field_validator

from hotknob.model_runtime import protocol
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer, free_port
from tests.test_metrics_health import health, samples, wait_for
from tests.test_socket_server import Client, Harness, make_state, wait_until

pytestmark = pytest.mark.timeout(90)

APP = "t"
SLOW_S = 0.3


class Slow(BaseModel):
    """``--schema tests.test_review_protocol:Slow``: validating ``x = 0.5`` takes
    ``SLOW_S``, so the change's latency is known from below."""

    model_config = ConfigDict(extra="forbid")
    x: float = 1.0

    @field_validator("x")
    @classmethod
    def slow_at_half(cls, value: float) -> float:
        if value == 0.5:
            time.sleep(SLOW_S)
        return value


class Line:
    """A connection that sends raw bytes and reads lines: a client no library wrote."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None once the daemon closed the connection."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


def json_lines_only(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """Every line of the daemon's log, each of which must be JSON (never a traceback)."""
    lines = daemon.log().splitlines()
    bad = [line for line in lines if not line.startswith("{")]
    assert not bad, "not JSON:\n" + "\n".join(bad[:20])
    return [json.loads(line) for line in lines]


@pytest.fixture
def harness_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="hk-"))  # a socket path must fit in 108 bytes
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- hello: its extra fields, its protocol, its name ---------------------------------------------


def test_hello_extras_named_like_the_daemons_own_fields_are_logged_apart(tmp_path: Path) -> None:
    big = "y" * 500_000
    extras = {"event": "x", "self": 1, "uid": 4242, "peer_pid": 1, "client_id": 999, "big": big}
    with DaemonProcess(tmp_path, app=APP) as daemon:
        c = Line(daemon.socket_path)
        hello = {"type": "hello", "protocol": 1, "client": "odd", "pid": 77, **extras}
        c.send(json.dumps(hello).encode() + b"\n")
        snapshot = c.recv()
        assert snapshot is not None and snapshot["type"] == "snapshot"
        c.close()
        wait_for(lambda: daemon.events("client_disconnected"), "the disconnect logged")
    [connected] = [e for e in json_lines_only(daemon) if e.get("event") == "client_connected"]
    # The kernel's view of the peer (this test process), not what the client claimed.
    assert (connected["uid"], connected["peer_pid"]) == (os.getuid(), os.getpid())
    assert connected["client_id"] != 999 and connected["pid"] == 77
    assert connected["extra_event"] == "x" and connected["extra_self"] == 1
    assert (connected["extra_uid"], connected["extra_peer_pid"]) == (4242, 1)
    assert connected["extra_client_id"] == 999
    assert connected["extra_big"].startswith("yyy") and len(connected["extra_big"]) <= 200
    assert len(json.dumps(connected)) < 2000


def test_so_many_hello_extras_are_logged_in_part(tmp_path: Path) -> None:
    extras = {f"k{i}": i for i in range(1000)}
    with (
        DaemonProcess(tmp_path, app=APP) as daemon,
        RawClient(daemon.socket_path, "many", **extras),
    ):
        [connected] = wait_for(lambda: daemon.events("client_connected"), "the connect logged")
    assert connected["extra_k0"] == 0 and "extra_k999" not in connected
    assert connected["extra_fields_not_logged"] == 1000 - 16


@pytest.mark.parametrize("version", [True, 1.0, "1", None])
def test_hello_protocol_must_be_the_integer_1(version: object) -> None:
    hello = {"type": "hello", "protocol": version, "client": "x"}
    with pytest.raises(protocol.ProtocolError, match="unsupported protocol"):
        protocol.validate_client_message(hello, said_hello=False)
    protocol.validate_client_message({**hello, "protocol": 1}, said_hello=False)


@pytest.mark.parametrize(
    "line",
    [
        rb'{"type":"hello","protocol":1,"client":"bad\ud800"}',
        rb'{"type":"metrics","step":1,"latest":{"m\udfff":1}}',
        rb'{"type":"applied","version":1,"step":1,"errors":[{"error":"\uDBFF."}]}',
        rb'{"type":"event","deep":[[[{"a":"\udc00\ud800"}]]],"big":1e999}',
    ],
)
def test_a_lone_surrogate_anywhere_in_a_line_is_refused(line: bytes) -> None:
    with pytest.raises(protocol.ProtocolError, match="lone surrogate"):
        protocol.decode(line)


def test_a_surrogate_pair_and_an_escaped_backslash_are_text() -> None:
    message = protocol.decode(rb'{"type":"hello","client":"\ud83d\ude00","note":"\\ud800"}')
    assert message["client"] == "\U0001f600" and message["note"] == "\\ud800"


def test_a_lone_surrogate_in_a_name_is_refused_and_metrics_keep_working(tmp_path: Path) -> None:
    port = free_port()
    metrics_addr = ["--metrics-addr", f"127.0.0.1:{port}"]
    with DaemonProcess(tmp_path, app=APP, extra=metrics_addr) as daemon:
        named = Line(daemon.socket_path)
        named.send(rb'{"type":"hello","protocol":1,"client":"bad\ud800"}' + b"\n")
        error = named.recv()
        assert error is not None and error["type"] == "error", error
        assert "lone surrogate" in error["error"] and named.recv() is None
        with RawClient(daemon.socket_path, "good") as good:
            good.sock.sendall(rb'{"type":"metrics","step":1,"latest":{"m\udfff":1}}' + b"\n")
            refused = good.next()
            assert refused["type"] == "error" and "lone surrogate" in refused["error"]
        with RawClient(daemon.socket_path, "fine") as fine:
            fine.send({"type": "metrics", "step": 1, "latest": {"loss": 0.5}})
            series = 'hotknob_client_metric{client="fine",metric="loss"}'
            wait_for(lambda: samples(port).get(series) == 0.5, "the good client's series")
    json_lines_only(daemon)


# --- applied ------------------------------------------------------------------------------------


@pytest.fixture
def harness(harness_dir: Path) -> Iterator[Harness]:
    h = Harness(harness_dir, hello_timeout=0.5)
    try:
        yield h.start()
    finally:
        h.stop()


def test_an_ack_of_a_version_never_sent_is_recorded_with_one_line(harness: Harness) -> None:
    # The process runs a state this daemon does not know (a checkpoint's, a crashed
    # daemon's): status shows it, and a guard waits on it (test_guards_judging).
    c = Client(harness.path)
    try:
        c.hello("acker")
        c.send({"type": "applied", "version": 1_000_000_000, "step": 5})
        c.send({"type": "applied", "version": 2, "step": 6})  # not yet sent either
        c.send({"type": "applied", "version": 1, "step": 7})
        wait_until(lambda: len(harness.applied) == 3, "the acks")
        assert [m["version"] for _, m in harness.applied] == [1_000_000_000, 2, 1]
        [unknown] = harness.events("applied_unknown_version")
        assert (unknown["version"], unknown["newest_sent"]) == (1_000_000_000, 1)
        harness.publish(make_state(2, lr=0.3))  # the connection is still served
        update = c.recv()
        assert update is not None and update["version"] == 2
    finally:
        c.close()


def test_an_ack_sent_with_the_hello_before_the_snapshot_is_read_counts(harness: Harness) -> None:
    c = Client(harness.path)
    try:
        hello = protocol.encode(protocol.hello("eager"))
        c.send(hello + protocol.encode(protocol.applied(1, 0)))
        wait_until(lambda: len(harness.applied) == 1, "the ack")
        assert not harness.events("applied_unknown_version")
    finally:
        c.close()


# --- slow, silent and too many clients ----------------------------------------------------------


def test_a_connection_without_hello_is_closed_after_the_hello_timeout(harness: Harness) -> None:
    silent, talker = Client(harness.path), Client(harness.path)
    try:
        talker.hello("talker")
        assert 'no "hello" within 0.5 s' in silent.expect_error_then_close()
        time.sleep(0.5)  # a client that said hello stays, however long it is quiet
        harness.publish(make_state(2, lr=0.3))
        update = talker.recv()
        assert update is not None and update["version"] == 2
    finally:
        silent.close()
        talker.close()


def test_a_client_that_reads_slowly_is_not_dropped_as_not_reading(harness_dir: Path) -> None:
    h = Harness(harness_dir, drain_timeout=0.5)
    slow = None
    try:
        h.start()
        slow = Client(h.path)
        slow.hello("slow")
        blob = {f"k{i:04d}": "v" * 1000 for i in range(450)}
        h.publish(make_state(2, blob=blob))  # 0.9 MB, written at once: most of it waits
        h.publish(make_state(3, lr=0.3, blob=blob))  # 0.45 MB, behind it, for the writer
        slow.sock.settimeout(5)
        got = bytearray()
        while got.count(b"\n") < 2:  # 64 KiB every 0.1 s: about 2 s in all
            chunk = slow.sock.recv(64 * 1024)
            assert chunk, f"dropped after {len(got)} bytes: {h.events('client_error')}"
            got += chunk
            time.sleep(0.1)
        lines = bytes(got).splitlines()
        assert [protocol.decode(line)["version"] for line in lines] == [2, 3]
        assert not h.events("client_error")
    finally:
        if slow is not None:
            slow.close()
        h.stop()


def idle_connections(daemon: DaemonProcess, count: int = 90) -> list[socket.socket]:
    """``count`` connections that say no hello: each holds a descriptor of the daemon's
    until its hello is late (those past the backlog wait in it)."""
    idle = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(daemon.socket_path))
        except BlockingIOError:
            pass  # the backlog is full: it waits
        idle.append(s)
    return idle


def test_out_of_file_descriptors_is_one_log_line_and_serving_resumes(tmp_path: Path) -> None:
    limit = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "import hotknob.daemon.socket_server as server\n"
        "server.DEFAULT_HELLO_TIMEOUT_S = 3.0"
    )
    with DaemonProcess(tmp_path, app=APP, before_main=limit) as daemon:
        idle = idle_connections(daemon)
        failed = wait_for(lambda: daemon.events("accept_failed"), "accept_failed logged")
        assert failed[0]["failures"] >= 1 and "open files" in failed[0]["error"]
        time.sleep(1.5)  # the loop retries many times a second meanwhile
        # The idle connections are closed by the daemon when their hello is late, and a
        # client that says hello is served again, while they are all still open here.
        with RawClient(daemon.socket_path, "after") as after:
            assert after.snapshot["type"] == "snapshot"
        for s in idle:
            s.close()
    events = json_lines_only(daemon)
    assert len([e for e in events if e.get("event") == "accept_failed"]) <= 2
    assert not [e for e in events if e.get("event") == "client_error" and "internal" in e["error"]]


# --- metrics that follow each change ------------------------------------------------------------


def slow_daemon(tmp_path: Path, etcd: EtcdServer) -> tuple[DaemonProcess, int]:
    port = free_port()
    extra = ["--schema", "tests.test_review_protocol:Slow", "--metrics-addr", f"127.0.0.1:{port}"]
    return DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=extra), port


def test_the_latency_gauge_shows_the_change_just_made(etcd: EtcdServer, tmp_path: Path) -> None:
    daemon, port = slow_daemon(tmp_path, etcd)
    gauge = "hotknob_last_change_latency_seconds"
    with daemon, RawClient(daemon.socket_path, "p") as client:
        etcd.etcdctl("put", f"/hotknob/{APP}/config/x", "0.5")
        assert client.next_update()["values"] == {"x": 0.5}
        wait_for(lambda: samples(port)[gauge] >= SLOW_S, "the slow change's latency")
        etcd.etcdctl("put", f"/hotknob/{APP}/config/x", "0.2")
        assert client.next_update()["values"] == {"x": 0.2}
        wait_for(lambda: samples(port)[gauge] < SLOW_S, "the quick change's latency")


def test_the_revision_gauge_follows_a_revision_that_changed_nothing(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    daemon, port = slow_daemon(tmp_path, etcd)
    gauge = "hotknob_etcd_revision"
    with daemon, RawClient(daemon.socket_path, "p") as client:
        etcd.etcdctl("put", f"/hotknob/{APP}/config/x", "0.2")
        changed = client.next_update()["revision"]
        wait_for(lambda: samples(port)[gauge] == changed, "the change's revision")
        etcd.etcdctl("put", f"/hotknob/{APP}/config/x", "0.2")  # the value in force again
        wait_for(lambda: health(port)[1]["revision"] == changed + 1, "healthz's revision")
        wait_for(lambda: samples(port)[gauge] == changed + 1, "the gauge's revision")
        assert client.no_message(0.3)  # nothing pushed: no value changed


def test_a_stop_while_accepts_fail_leaves_no_traceback(tmp_path: Path) -> None:
    """asyncio retries a failed accept a moment later, even once the server is closed:
    a daemon stopped while out of descriptors logged that retry's traceback on the closed
    socket, a line that is not JSON. The retry comes every 10 ms here, not every second,
    so that it falls within the stop."""
    limit = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "import asyncio.constants\n"
        "asyncio.constants.ACCEPT_RETRY_DELAY = 0.01\n"
        "import hotknob.daemon.socket_server as server\n"
        "server.DEFAULT_HELLO_TIMEOUT_S = 30.0"
    )
    daemon = DaemonProcess(tmp_path, app=APP, before_main=limit).start()
    idle: list[socket.socket] = []
    try:
        idle = idle_connections(daemon)
        wait_for(lambda: daemon.events("accept_failed"), "accept_failed logged")
        assert daemon.stop() == 0
    finally:
        for s in idle:
            s.close()
        daemon.stop()
    json_lines_only(daemon)
