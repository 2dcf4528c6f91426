"""The daemon's socket server, against real Unix sockets and raw stdlib clients.

The server runs in an event loop on its own thread (as in the daemon, the
engine's calls go through that loop); clients are plain blocking sockets that
speak JSON lines, as ``socat`` would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from structlog.testing import LogCapture

from hotknob.config.changes import changed_keys
from hotknob.daemon.socket_server import (
    ClientInfo,
    Published,
    SocketInUse,
    SocketPathError,
    SocketServer,
)
from hotknob.model_runtime import protocol

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
DEADLINE_S = 10.0


def make_state(version: int, lr: float = 0.1, blob: dict[str, str] | None = None) -> Published:
    values: dict[str, Any] = {"train": {"lr": lr, "momentum": 0.9}, "sampling": {"top_k": 0}}
    flat: dict[str, Any] = {"train.lr": lr, "train.momentum": 0.9, "sampling.top_k": 0}
    if blob is not None:
        values["blob"] = blob
        flat.update({f"blob.{k}": v for k, v in blob.items()})
    sources = dict.fromkeys(flat, "defaults") | {"train.lr": "etcd"}
    return Published(
        version=version, revision=100 + version, values=values, sources=sources, flat=flat
    )


class Harness:
    """A SocketServer in a loop thread, a state holder for ``current()``, recorded callbacks."""

    def __init__(self, folder: Path, **kwargs: Any):
        self.path = folder / "run" / "app.sock"
        self.state = make_state(1)
        self.logs = LogCapture()
        self.applied: list[tuple[ClientInfo, dict[str, Any]]] = []
        self.metrics: list[tuple[ClientInfo, dict[str, Any]]] = []
        self.disconnected: list[ClientInfo] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop")
        self.thread.start()
        callbacks: dict[str, Any] = {
            "on_applied": lambda info, msg: self.applied.append((info, msg)),
            "on_metrics": lambda info, msg: self.metrics.append((info, msg)),
            "on_disconnect": self.disconnected.append,
        }
        callbacks.update(kwargs)
        self.server = self.new_server(**callbacks)
        self.started = False

    def new_server(self, **kwargs: Any) -> SocketServer:
        log = structlog.wrap_logger(None, processors=[self.logs])
        return SocketServer(self.path, lambda: self.state, log=log, **kwargs)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = DEADLINE_S) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def in_loop() -> T:
            return fn()

        return self.run(in_loop())

    def start(self) -> Harness:
        self.run(self.server.start())
        self.started = True
        return self

    def publish(self, state: Published) -> None:
        self.state = state
        self.call(lambda: self.server.publish(state))

    def events(self, name: str) -> list[Any]:
        return [e for e in list(self.logs.entries) if e["event"] == name]

    def stop(self) -> None:
        try:
            if self.started:
                self.run(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(DEADLINE_S)
            self.loop.close()


class Client:
    """A raw blocking client speaking JSON lines."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE_S)
        self.sock.connect(str(path))
        self.buf = bytearray()

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else protocol.encode(message)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close first; what it answered is still readable

    def recv_line(self) -> bytes | None:
        """The next line, or None once the server closed the connection."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return line

    def recv(self) -> dict[str, Any] | None:
        line = self.recv_line()
        return None if line is None else protocol.decode(line)

    def hello(self, name: str = "trainer-0", **extra: Any) -> dict[str, Any]:
        self.send(protocol.hello(name, **extra))
        message = self.recv()
        assert message is not None and message["type"] == "snapshot", message
        return message

    def expect_error_then_close(self) -> str:
        message = self.recv()
        assert message is not None and message["type"] == "error", message
        assert self.recv() is None, "the connection should be closed after an error"
        return str(message["error"])

    def close(self) -> None:
        self.sock.close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder: a Unix socket path must fit in 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="hk-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def harness(short_dir: Path) -> Iterator[Harness]:
    h = Harness(short_dir)
    try:
        yield h.start()
    finally:
        h.stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for c in opened:
        c.close()


def connect(harness: Harness, clients: list[Client]) -> Client:
    c = Client(harness.path)
    clients.append(c)
    return c


def test_a_socket_folder_that_is_a_symlink_to_nothing_is_a_clear_error(tmp_path: Path) -> None:
    from hotknob.daemon.socket_path import prepare_folder

    folder = tmp_path / "sock"
    folder.symlink_to(tmp_path / "nowhere")
    with pytest.raises(SocketPathError, match=r"cannot use .*sock for the socket: No such file"):
        prepare_folder(folder)


def test_hello_is_answered_with_a_snapshot(harness: Harness, clients: list[Client]) -> None:
    c = connect(harness, clients)
    snap = c.hello("trainer-3", rank=3, node="n1")
    assert snap["version"] == 1 and snap["revision"] == 101
    assert snap["values"]["train"] == {"lr": 0.1, "momentum": 0.9}
    assert snap["sources"]["train.lr"] == "etcd"
    [info] = harness.call(lambda: harness.server.clients)
    assert (info.name, info.pid, info.uid) == ("trainer-3", os.getpid(), os.getuid())
    assert info.extra == {"rank": 3, "node": "n1"} and not info.watch
    [connected] = harness.events("client_connected")
    assert connected["client"] == "trainer-3" and connected["pid"] == os.getpid()


def test_publish_sends_the_diff_and_the_full_values(
    harness: Harness, clients: list[Client]
) -> None:
    c = connect(harness, clients)
    c.hello()
    harness.publish(make_state(2, lr=0.01))
    update = c.recv()
    assert update is not None and update["type"] == "update"
    assert (update["version"], update["revision"]) == (2, 102)
    assert update["changed"] == {"train.lr": 0.01}
    assert update["values"]["train"]["lr"] == 0.01
    harness.publish(make_state(2, lr=0.5))  # same version: a no-op
    harness.publish(make_state(3, lr=0.01, blob={"a": "x"}))
    update = c.recv()
    assert update is not None and update["version"] == 3
    assert update["changed"] == {"blob.a": "x"}


def test_changed_keys_counts_type_changes_and_removed_keys() -> None:
    old = {"a": 1, "b": 1.0, "c": True, "d": "x", "gone": 5}
    new = {"a": 1.0, "b": 1.0, "c": 1, "d": "x", "new": None}
    assert changed_keys(old, new) == {"a": 1.0, "c": 1, "new": None, "gone": None}


def test_a_snapshot_is_the_newest_state_and_late_clients_get_no_stale_update(
    harness: Harness, clients: list[Client]
) -> None:
    harness.publish(make_state(5, lr=0.2))
    c = connect(harness, clients)
    assert c.hello()["version"] == 5
    harness.publish(make_state(6, lr=0.3))
    update = c.recv()
    assert update is not None and update["version"] == 6 and update["changed"] == {"train.lr": 0.3}


def test_a_push_of_the_state_a_snapshot_already_had_sends_nothing(
    harness: Harness, clients: list[Client]
) -> None:
    # The engine's current state runs ahead of a push the throttle holds back: a client
    # that says hello in between gets it in its snapshot, and the push must not repeat it.
    harness.publish(make_state(1))
    harness.state = make_state(2, lr=0.5)
    c = connect(harness, clients)
    assert c.hello()["version"] == 2
    harness.publish(make_state(2, lr=0.5))  # the push the throttle held back
    harness.publish(make_state(3, lr=0.6))
    update = c.recv()  # the next line is version 3's update, nothing before it
    assert update is not None and update["version"] == 3 and update["changed"] == {"train.lr": 0.6}


def _version_of(line: bytes) -> int:
    match = re.search(rb'"version":(\d+)', line[:200])
    assert match is not None, line[:200]
    return int(match.group(1))


class Readers:
    """Many non-blocking clients read on this thread; only each line's version is parsed."""

    def __init__(self, socks: list[socket.socket]):
        self.sel = selectors.DefaultSelector()
        self.bufs = {s: bytearray() for s in socks}
        self.versions: dict[socket.socket, list[int]] = {s: [] for s in socks}
        self.last_line: dict[socket.socket, bytes] = {}
        for s in socks:
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)

    def pump_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            for key, _ in self.sel.select(timeout=0.05):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                chunk = s.recv(1 << 22)
                assert chunk, "a reader was disconnected"
                buf = self.bufs[s]
                buf += chunk
                while (end := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:end])
                    del buf[: end + 1]
                    self.versions[s].append(_version_of(line))
                    self.last_line[s] = line

    def all_at(self, version: int) -> bool:
        return all(v and v[-1] == version for v in self.versions.values())

    def close(self) -> None:
        self.sel.close()


def test_a_stuck_client_coalesces_and_never_delays_the_others(
    harness: Harness, clients: list[Client]
) -> None:
    blob = {f"k{i:04d}": f"{i:04d}" * 25 for i in range(1000)}  # about 110 KB of values
    harness.publish(make_state(1, blob=blob))
    stuck = connect(harness, clients)
    stuck.send(protocol.hello("stuck"))  # ...and reads nothing until the end
    readers = [connect(harness, clients) for _ in range(19)]
    for r in readers:
        r.hello("reader")
    wait_until(lambda: len(harness.call(lambda: harness.server.clients)) == 20, "20 clients")
    pool = Readers([r.sock for r in readers])
    peak = 0

    async def publish_batch(first: int, count: int) -> int:
        most = 0
        for version in range(first, first + count):
            harness.state = make_state(version, lr=version / 1000, blob=blob)
            harness.server.publish(harness.state)
            most = max(most, harness.server.write_buffer_bytes)
            await asyncio.sleep(0.001)  # a fast engine; readers keep reading meanwhile
        return most

    published, loop = 1, harness.loop
    try:
        for _ in range(5):
            batch = asyncio.run_coroutine_threadsafe(publish_batch(published + 1, 100), loop)
            published += 100
            target = published
            pool.pump_until(lambda: batch.done() and pool.all_at(target), f"all at v{target}")  # noqa: B023
            peak = max(peak, batch.result())
    finally:
        pool.close()

    for versions in pool.versions.values():
        assert versions == sorted(set(versions)), "versions must strictly increase"
    message_size = len(protocol.encode(protocol.update(1, 1, {}, make_state(1, blob=blob).values)))
    assert peak < 20 * (64 * 1024 + 2 * message_size), f"daemon held {peak} bytes"
    assert "stuck" in [c.name for c in harness.call(lambda: harness.server.clients)]

    stuck.sock.settimeout(DEADLINE_S)
    received: list[bytes] = []
    while True:
        line = stuck.recv_line()
        assert line is not None
        received.append(line)
        if _version_of(line) == published:
            break
    assert len(received) < 20, f"the stuck client got {len(received)} of {published} states"
    last = json.loads(received[-1])
    assert last["type"] == "update" and last["values"]["train"]["lr"] == published / 1000
    assert last["changed"]["train.lr"] == published / 1000


def test_a_client_that_never_reads_is_dropped_after_the_drain_timeout(
    short_dir: Path, clients: list[Client]
) -> None:
    h = Harness(short_dir, drain_timeout=0.3)
    try:
        h.start()
        blob = {f"k{i:04d}": "v" * 200 for i in range(1000)}
        stuck = connect(h, clients)
        stuck.send(protocol.hello("stuck"))
        other = connect(h, clients)
        other.hello("other")
        for version in range(2, 12):
            h.publish(make_state(version, blob=blob))
            while (message := other.recv()) is not None and message["version"] != version:
                pass
        wait_until(lambda: [i.name for i in h.disconnected] == ["stuck"], "stuck dropped")
        [error] = [e for e in h.events("client_error") if e.get("client") == "stuck"]
        assert "not reading" in error["error"]
        h.publish(make_state(12, lr=0.7, blob=blob))
        while (message := other.recv()) is not None and message["version"] != 12:
            pass
        assert message is not None and message["values"]["train"]["lr"] == 0.7
    finally:
        h.stop()


OVERSIZED = b'{"type":"hello","pad":"' + b"x" * (protocol.MAX_LINE_BYTES + 10) + b'"}\n'


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ([b"this is not json\n"], "not JSON"),
        ([b"[1, 2, 3]\n"], "JSON object"),
        ([b'{"no_type": 1}\n'], '"type"'),
        ([b'{"type":"hello","protocol":2,"client":"x"}\n'], "unsupported protocol 2"),
        ([b'{"type":"applied","version":1,"step":5}\n'], "before"),
        ([b'{"type":"hello","protocol":1}\n', b'{"type":"bogus"}\n'], "unknown message type"),
        ([b'{"type":"hello","protocol":1}\n', b'{"type":"\\ud800"}\n'], "lone surrogate"),
        ([b'{"type":"hello","protocol":1}\n', b'{"type":"hello","protocol":1}\n'], "already"),
        ([b'{"type":"hello","protocol":1}\n', b'{"type":"applied","step":3}\n'], "version"),
        ([b'{"type":"hello","client":"\xff\xfe"}\n'], "UTF-8"),
        ([OVERSIZED], "byte limit"),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-type",
        "wrong-protocol",
        "before-hello",
        "unknown-type",
        "type-not-text",
        "second-hello",
        "bad-applied",
        "bad-utf8",
        "oversized",
    ],
)
def test_a_bad_message_closes_that_connection_only(
    harness: Harness, clients: list[Client], lines: list[bytes], reason: str
) -> None:
    good = connect(harness, clients)
    good.hello("good")
    bad = connect(harness, clients)
    for line in lines:
        bad.send(line)
    if lines[0].startswith(b'{"type":"hello","protocol":1}'):
        assert (bad.recv() or {}).get("type") == "snapshot"
    assert reason in bad.expect_error_then_close()
    assert any(reason in e["error"] for e in harness.events("client_error"))
    harness.publish(make_state(2, lr=0.02))
    update = good.recv()
    assert update is not None and update["changed"] == {"train.lr": 0.02}
    late = connect(harness, clients)
    assert late.hello()["version"] == 2


def test_a_line_of_exactly_the_limit_is_accepted(harness: Harness, clients: list[Client]) -> None:
    head = b'{"type":"hello","protocol":1,"client":"big","pad":"'
    pad = b"x" * (protocol.MAX_LINE_BYTES - len(head) - len(b'"}\n'))
    c = connect(harness, clients)
    c.send(head + pad + b'"}\n')
    message = c.recv()
    assert message is not None and message["type"] == "snapshot"


def test_folder_is_0700_and_socket_is_0600(harness: Harness) -> None:
    assert stat.S_IMODE(os.stat(harness.path.parent).st_mode) == 0o700
    mode = os.lstat(harness.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_a_stale_socket_file_is_replaced(short_dir: Path, clients: list[Client]) -> None:
    h = Harness(short_dir)
    try:
        h.path.parent.mkdir(mode=0o700)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(h.path))
        dead.close()  # the file stays, nobody listens: a crashed daemon's leftover
        h.start()
        assert connect(h, clients).hello()["version"] == 1
        assert h.events("stale_socket_removed")
    finally:
        h.stop()


def test_a_live_daemon_is_not_taken_over(harness: Harness, clients: list[Client]) -> None:
    second = harness.new_server()
    with pytest.raises(SocketInUse):
        harness.run(second.start())
    harness.run(second.close())
    assert harness.path.exists()
    assert connect(harness, clients).hello()["version"] == 1


def test_a_daemon_bound_but_not_yet_listening_is_not_taken_over(short_dir: Path) -> None:
    """Between its bind and its listen a daemon refuses connections like a stale socket;
    the lock it holds from before its bind keeps another one from removing its socket."""
    from hotknob.daemon.socket_path import lock_socket_path

    h = Harness(short_dir)
    try:
        h.path.parent.mkdir(mode=0o700)
        lock = lock_socket_path(h.path)  # the first daemon, caught between bind and listen
        assert lock is not None
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound.bind(str(h.path))
        inode = os.stat(h.path).st_ino
        with pytest.raises(SocketInUse, match="another daemon holds"):
            h.run(h.server.start())
        assert os.stat(h.path).st_ino == inode  # its socket is still there
        bound.close()
        os.close(lock)  # the first one is gone (its socket file left behind): now it starts
        h.path.unlink()
        h.start()
        assert h.server.clients == []
    finally:
        h.stop()


def test_a_file_that_is_not_a_socket_is_never_removed(short_dir: Path) -> None:
    h = Harness(short_dir)
    try:
        h.path.parent.mkdir(mode=0o700)
        h.path.write_text("precious")
        with pytest.raises(SocketPathError, match="not a socket"):
            h.run(h.server.start())
        assert h.path.read_text() == "precious"
    finally:
        h.stop()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_folder_writable_by_group_or_others_is_refused(short_dir: Path, mode: int) -> None:
    h = Harness(short_dir)
    try:
        h.path.parent.mkdir()
        os.chmod(h.path.parent, mode)
        with pytest.raises(SocketPathError, match="writable by group or others") as caught:
            h.run(h.server.start())
        assert f"mode {mode:o}" in str(caught.value)
        assert not h.path.exists()
    finally:
        h.stop()


def test_close_removes_the_socket_and_closes_clients(
    short_dir: Path, clients: list[Client]
) -> None:
    h = Harness(short_dir)
    try:
        h.start()
        c = connect(h, clients)
        c.hello("leaving")
        stuck = connect(h, clients)
        stuck.send(protocol.hello("stuck"))
        blob = {f"k{i:04d}": "v" * 200 for i in range(1000)}
        for version in range(2, 6):
            h.publish(make_state(version, blob=blob))
        while (message := c.recv()) is not None and message["version"] != 5:
            pass
        h.run(h.server.close())
        assert c.recv() is None
        assert not h.path.exists()
        assert sorted(i.name for i in h.disconnected) == ["leaving", "stuck"]
        assert h.call(lambda: h.server.write_buffer_bytes) == 0
        h.run(h.server.close())  # idempotent
        with pytest.raises(OSError):
            Client(h.path)
    finally:
        h.stop()


def test_applied_and_metrics_reach_the_callbacks(harness: Harness, clients: list[Client]) -> None:
    c = connect(harness, clients)
    c.hello("trainer-1", rank=1)
    c.send(protocol.applied(1, 1200))
    c.send({"type": "metrics", "step": 1200, "latest": {"loss": 2.5}, "window": {"loss": [3, 2.5]}})
    wait_until(lambda: bool(harness.applied and harness.metrics), "callbacks")
    [(info, msg)] = harness.applied
    assert info.name == "trainer-1" and info.extra == {"rank": 1}
    assert (msg["version"], msg["step"]) == (1, 1200)
    [(_, metrics)] = harness.metrics
    assert metrics["latest"] == {"loss": 2.5} and metrics["window"] == {"loss": [3, 2.5]}


def test_a_failing_callback_is_logged_and_the_server_goes_on(
    short_dir: Path, clients: list[Client]
) -> None:
    calls: list[int] = []

    def explode(info: ClientInfo, msg: dict[str, Any]) -> None:
        calls.append(msg["step"])
        raise RuntimeError("boom")

    h = Harness(short_dir, on_applied=explode)
    try:
        h.start()
        c = connect(h, clients)
        c.hello()
        c.send(protocol.applied(1, 1))
        c.send(protocol.applied(1, 2))
        wait_until(lambda: calls == [1, 2], "both applied messages")
        assert len(h.events("callback_failed")) == 2
        h.publish(make_state(2, lr=0.3))
        update = c.recv()
        assert update is not None and update["version"] == 2
    finally:
        h.stop()


def test_disconnect_is_reported_and_logged(harness: Harness, clients: list[Client]) -> None:
    c = connect(harness, clients)
    c.hello("worker-7")
    c.close()
    wait_until(lambda: len(harness.disconnected) == 1, "on_disconnect")
    assert harness.disconnected[0].name == "worker-7"
    [gone] = harness.events("client_disconnected")
    assert gone["client"] == "worker-7" and gone["pid"] == os.getpid()
    assert harness.call(lambda: harness.server.clients) == []


def test_a_uid_not_allowed_is_refused(short_dir: Path) -> None:
    h = Harness(short_dir, allowed_uids=frozenset({os.getuid() + 1}))
    try:
        h.start()
        c = Client(h.path)
        try:
            c.send(protocol.hello("intruder"))
            assert f"uid {os.getuid()}" in c.expect_error_then_close()
        finally:
            c.close()
        [refused] = h.events("client_refused")
        assert refused["uid"] == os.getuid()
        assert h.disconnected == [] and h.call(lambda: h.server.clients) == []
    finally:
        h.stop()


def test_events_go_to_watch_subscribers_only(harness: Harness, clients: list[Client]) -> None:
    watcher = connect(harness, clients)
    watcher.hello("hotknob-watch", watch=True)
    plain = connect(harness, clients)
    plain.hello("trainer")
    event = {"event": "change_rejected", "key": "train.lr", "new": -1, "reason": "must be > 0"}
    harness.call(lambda: harness.server.broadcast_event(event))
    harness.publish(make_state(2, lr=0.2))
    got = watcher.recv()
    assert got is not None and got["type"] == "event" and got["key"] == "train.lr"
    assert (watcher.recv() or {}).get("type") == "update"
    assert (plain.recv() or {}).get("type") == "update"


def test_has_watchers_follows_the_watch_clients(harness: Harness, clients: list[Client]) -> None:
    """What the watch thread asks before it wakes the loop for an event."""
    plain = connect(harness, clients)
    plain.hello("trainer")
    wait_until(lambda: len(harness.server.clients) == 1, "its hello taken")
    assert not harness.server.has_watchers
    watcher = connect(harness, clients)
    watcher.hello("hotknob-watch", watch=True)
    wait_until(lambda: len(harness.server.clients) == 2, "the watcher's hello taken")
    assert harness.server.has_watchers
    watcher.close()
    wait_until(lambda: len(harness.server.clients) == 1, "the watcher gone")
    assert not harness.server.has_watchers


def test_a_client_reported_error_closes_its_connection(
    harness: Harness, clients: list[Client]
) -> None:
    c = connect(harness, clients)
    c.hello("confused")
    c.send(protocol.error("could not parse your update"))
    assert c.recv() is None
    [error] = [e for e in harness.events("client_error") if e.get("side") == "client"]
    assert error["error"] == "could not parse your update"


def test_a_half_closed_client_still_gets_its_snapshot(
    harness: Harness, clients: list[Client]
) -> None:
    c = connect(harness, clients)
    c.send(b'{"type":"hello","protocol":1,"client":"socat"}')  # no newline, then EOF
    c.sock.shutdown(socket.SHUT_WR)
    message = c.recv()
    assert message is not None and message["type"] == "snapshot"
    assert c.recv() is None


def test_states_published_from_another_thread_arrive_whole_and_in_order(
    harness: Harness, clients: list[Client]
) -> None:
    """The watch thread publishes a lone etcd change itself; the loop meanwhile sends
    events, greets new clients and flushes what a thread's write left over."""
    blob = {f"k{i:04d}": f"{i:04d}" * 25 for i in range(1000)}  # about 110 KB: partial writes
    first = connect(harness, clients)
    first.send(protocol.hello("watcher", watch=True))
    assert (first.recv() or {}).get("type") == "snapshot"
    readers = [first]
    final = 120

    def publish_all() -> None:  # on this test's thread: not the server's loop
        for version in range(2, final + 1):
            state = make_state(version, lr=version / 1000, blob=blob if version % 3 else None)
            harness.state = state
            harness.server.publish(state)
            if version % 10 == 0:
                event = {"event": "change_accepted", "version": version}
                harness.loop.call_soon_threadsafe(harness.server.broadcast_event, event)
                late = connect(harness, clients)  # greeted on the loop while this thread goes on
                late.send(protocol.hello(f"late-{version}"))
                readers.append(late)
            time.sleep(0.001)

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    seen: dict[int, list[int]] = {}
    try:
        done = [False] * 16
        while publisher.is_alive() or not all(done[: len(readers)]):
            for i, reader in enumerate(list(readers)):
                if done[i]:
                    continue
                message = reader.recv()  # each line must decode whole
                assert message is not None
                if message["type"] == "event":
                    continue
                seen.setdefault(i, []).append(message["version"])
                assert message["values"]["train"]["lr"] == message["version"] / 1000 or (
                    message["version"] == 1
                )
                done[i] = message["version"] == final
    finally:
        publisher.join(DEADLINE_S)
    for versions in seen.values():
        assert versions == sorted(set(versions)), "versions must strictly increase"
    assert len(seen) == len(readers) == 1 + final // 10
    assert harness.events("publish_out_of_order") == []


def test_what_a_thread_could_not_write_is_finished_by_the_loop_before_anything_else(
    harness: Harness, clients: list[Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hotknob.daemon import socket_conn

    carried: list[int] = []
    flush = socket_conn.Connection._flush_carry

    def counting_flush(conn: socket_conn.Connection) -> None:
        carried.append(len(conn._carry or b""))
        flush(conn)

    monkeypatch.setattr(socket_conn.Connection, "_flush_carry", counting_flush)
    blob = {f"k{i:05d}": f"{i:05d}" * 40 for i in range(2000)}  # about 460 KB a state
    slow = connect(harness, clients)
    slow.hello("slow")  # then reads nothing while states pile up
    final = 6
    for version in range(2, final + 1):
        harness.state = make_state(version, lr=version / 1000, blob=blob)
        harness.server.publish(harness.state)  # from this thread, not the loop
    event = {"event": "change_accepted", "version": final}
    harness.call(lambda: harness.server.broadcast_event(event))  # not a watcher: not sent
    assert carried and carried[0] > 0, "the socket took part of a state: the loop sent the rest"
    versions = []
    while not versions or versions[-1] != final:
        message = slow.recv()
        assert message is not None and message["type"] == "update"
        assert message["values"]["train"]["lr"] == message["version"] / 1000
        versions.append(message["version"])
    assert versions == sorted(set(versions)) and versions[-1] == final
