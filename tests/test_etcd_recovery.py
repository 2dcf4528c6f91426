"""Recovery from what a plain reconnect gets wrong, against a real etcd.

A catch-up or a prefix larger than gRPC's default message limit, etcd wiped and written
again while the watcher was cut off, a hung member first in the endpoint list, an
endpoint that answers with an error the client library does not fail over on, and an
auth token that expires under an idle watch. The watcher is cut off from etcd by a TCP
relay in between, so that etcd itself can move on meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore, NoSpaceError
from hotknob.daemon.etcd_watcher import EtcdWatcher
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdCluster, EtcdServer
from tests.test_etcd_watcher import Recorder, watch

P = "/hotknob/test/config/"
MIB = 1024 * 1024


class Relay:
    """Forwards TCP connections from a loopback port to etcd; ``cut()`` closes every
    connection and refuses new ones until ``restore()``. With ``lifetime`` set, each
    connection is closed that many seconds after it was made."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._open = True
        self._closing = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.lifetime: float | None = None
        self._expiry: list[tuple[float, socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name="relay", daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closing:
            now = time.monotonic()
            for entry in [e for e in self._expiry if e[0] <= now]:
                self._expiry.remove(entry)
                for s in entry[1:]:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            if self.lifetime is not None:
                self._expiry.append((time.monotonic() + self.lifetime, client, upstream))
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _drop_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> None:
        self._open = False
        self._drop_all()

    def restore(self) -> None:
        self._open = True

    def close(self) -> None:
        self._closing = True
        self._drop_all()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()


@pytest.fixture
def relay(etcd: EtcdServer) -> Iterator[Relay]:
    r = Relay(etcd.client_port)
    yield r
    r.close()


@pytest.fixture
def store(etcd: EtcdServer) -> Iterator[EtcdStore]:
    s = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5.0))
    yield s
    s.close()


def big(n_bytes: int, tag: int) -> str:
    return json.dumps(f"{tag}" + "x" * n_bytes)


def cut_off_and_wait(relay: Relay, rec: Recorder) -> None:
    """Cut the watcher off once its stream is up, and wait until it notices."""
    rec.wait(lambda: bool(rec.connection) and rec.connection[-1][0])
    relay.cut()
    rec.wait(lambda: any(not up for up, _ in rec.connection))


# --- 1. messages over gRPC's default 4 MiB ---------------------------------------------------


def test_a_prefix_over_4_mib_is_read_in_full(etcd: EtcdServer, store: EtcdStore) -> None:
    for key in "abcd":
        store.put(P + f"junk/{key}", big(int(1.2 * MIB), 0))
    revision = store.put(P + "train/lr", "0.5")
    values, at = store.read_prefix(P)
    assert len(values) == 5 and values[P + "train/lr"] == b"0.5" and at == revision
    rec = Recorder()
    with watch(rec, EtcdOptions(endpoints=(etcd.endpoint,), timeout=5.0)) as w:
        assert w.wait_ready(10)
        assert rec.snapshots[0][0] == values


def test_a_catch_up_over_4_mib_is_delivered_revision_by_revision(
    relay: Relay, store: EtcdStore
) -> None:
    rec = Recorder()
    with watch(rec, EtcdOptions(endpoints=(relay.endpoint,), timeout=5.0)) as w:
        assert w.wait_ready(10)
        cut_off_and_wait(relay, rec)
        written = [store.put(P + "train/momentum", big(700 * 1024, i)) for i in range(8)]
        written.append(store.put(P + "train/lr", "0.3"))
        relay.restore()
        rec.wait(lambda: w.last_revision == written[-1], timeout=12)
        assert [c.revision for c in rec.changes] == written
        assert rec.changes[-1].puts == {P + "train/lr": b"0.3"}
        assert len(rec.snapshots) == 1


def test_a_catch_up_over_the_receive_limit_falls_back_to_a_full_read(
    relay: Relay, store: EtcdStore
) -> None:
    """Each revision fits the limit, the revisions missed together do not: the watcher
    reads the prefix again instead of asking for the same catch-up over and over."""
    store.put(P + "train/lr", "0.1")
    rec = Recorder()
    opts = EtcdOptions(endpoints=(relay.endpoint,), timeout=5.0, max_receive_bytes=MIB)
    with capture_logs() as logs, watch(rec, opts) as w:
        assert w.wait_ready(10)
        cut_off_and_wait(relay, rec)
        for i in range(8):
            store.put(P + "train/momentum", big(300 * 1024, i))
        store.put(P + "train/lr", "0.3")
        expected = store.read_prefix(P)
        relay.restore()
        rec.wait(lambda: len(rec.snapshots) == 2, timeout=10)
        assert rec.snapshots[1] == expected
        assert rec.changes == []
        after = store.put(P + "train/lr", "0.4")
        rec.wait(lambda: w.last_revision == after)
        assert rec.changes[-1].puts == {P + "train/lr": b"0.4"}
        assert [up for up, _ in rec.connection] == [True, False, True]
    resyncs = [e for e in logs if e["event"] == "etcd_resync"]
    assert len(resyncs) == 1 and "larger than max" in resyncs[0]["reason"]


def test_a_stream_that_breaks_soon_after_it_is_made_is_not_retried_at_once(
    relay: Relay,
) -> None:
    """The backoff starts again from its shortest delay only after a stream that
    delivered something or stayed up a while, not merely because one was made."""
    rec = Recorder()
    w = EtcdWatcher(
        EtcdOptions(endpoints=(relay.endpoint,), timeout=2.0),
        P,
        on_snapshot=rec.on_snapshot,
        on_change=rec.on_change,
        on_connection=rec.on_connection,
        backoff_initial=0.2,
        backoff_max=5.0,
    )
    with w:
        assert w.wait_ready(10)
        cut_off_and_wait(relay, rec)
        relay.lifetime = 0.3
        relay.restore()
        time.sleep(4.0)
        ups = sum(1 for up, _ in rec.connection[2:] if up)
    # Reset at each new stream, the delay stays near 0.2 s: about 9 streams in 4 s.
    assert 1 <= ups <= 6, rec.connection


# --- 2. etcd wiped and written again while the watcher was away ---------------------------------


def test_etcd_wiped_and_written_past_the_last_revision_is_read_again(
    etcd: EtcdServer, relay: Relay
) -> None:
    rec = Recorder()
    writer = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5.0))
    try:
        with capture_logs() as logs, watch(rec, EtcdOptions(endpoints=(relay.endpoint,))) as w:
            assert w.wait_ready(10)
            writer.put(P + "train/momentum", "0.7")
            last = max(writer.put(P + "train/lr", str(0.1 + i / 100)) for i in range(5))
            rec.wait(lambda: w.last_revision == last)
            cut_off_and_wait(relay, rec)
            writer.close()
            etcd.kill()
            shutil.rmtree(etcd.data_dir / "data")
            etcd.launch()
            etcd.wait_healthy()
            writer = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5.0))
            writer.put(P + "train/lr", "0.25")
            for i in range(last + 3):  # the new cluster goes past the watcher's revision
                writer.put(P + "train/warmup_steps", str(i + 1))
            expected = writer.read_prefix(P)
            assert expected[1] > last
            relay.restore()
            rec.wait(lambda: len(rec.snapshots) == 2)
            assert rec.snapshots[1] == expected
            assert P + "train/momentum" not in rec.snapshots[1][0]
            after = writer.put(P + "train/lr", "0.5")
            rec.wait(lambda: w.last_revision == after)
        assert any(e["event"] == "etcd_history_changed" for e in logs)
    finally:
        writer.close()


def test_a_reconnect_on_the_same_history_resumes_without_a_full_read(
    relay: Relay, store: EtcdStore
) -> None:
    rec = Recorder()
    with capture_logs() as logs, watch(rec, EtcdOptions(endpoints=(relay.endpoint,))) as w:
        assert w.wait_ready(10)
        store.put(P + "a", "1")
        store.commit({P + "b": "2"}, [P + "a"])
        rec.wait(lambda: len(rec.changes) == 2)
        cut_off_and_wait(relay, rec)
        missed = store.put(P + "c", "3")
        relay.restore()
        rec.wait(lambda: w.last_revision == missed)
        assert len(rec.snapshots) == 1
        assert rec.changes[-1].puts == {P + "c": b"3"}
    assert not [e for e in logs if e["event"] in ("etcd_history_changed", "etcd_resync")]


# --- 3. a hung member first in the list --------------------------------------------------------


@pytest.fixture
def hung_endpoint() -> Iterator[str]:
    """A port that accepts connections (the kernel does) and never answers anything."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_a_hung_first_endpoint_does_not_hold_up_the_first_read(
    etcd: EtcdServer, store: EtcdStore, hung_endpoint: str
) -> None:
    store.put(P + "train/lr", "0.5")
    rec = Recorder()
    opts = EtcdOptions(endpoints=(hung_endpoint, etcd.endpoint), timeout=5.0)
    started = time.monotonic()
    with watch(rec, opts) as w:
        assert w.wait_ready(10)
        assert time.monotonic() - started < 2.0
        assert rec.snapshots[0][0] == {P + "train/lr": b"0.5"}
        rec.wait(lambda: bool(rec.connection))
        assert rec.connection[0][0] and etcd.endpoint in rec.connection[0][1]
        r = store.put(P + "train/lr", "0.25")
        rec.wait(lambda: w.last_revision == r)


@pytest.mark.slow
def test_a_hung_member_first_in_the_list_of_a_cluster() -> None:
    """A hung follower costs the first read nothing; a hung leader costs the survivors'
    election, not the whole read timeout on it."""
    with EtcdCluster(3) as cluster:
        leader = cluster.leader()
        follower = next(m for m in cluster.members if m is not leader)
        leader.etcdctl("put", "--", P + "train/lr", "0.5")
        for hung in (follower, leader):
            others = [m.endpoint for m in cluster.members if m is not hung]
            hung.pause()
            try:
                rec = Recorder()
                opts = EtcdOptions(endpoints=(hung.endpoint, *others), timeout=8.0)
                started = time.monotonic()
                with watch(rec, opts) as w:
                    assert w.wait_ready(12)
                    took = time.monotonic() - started
                    assert rec.snapshots[0][0] == {P + "train/lr": b"0.5"}
                assert took < (1.0 if hung is follower else 6.0), (hung is leader, took)
            finally:
                hung.resume()


def test_a_daemon_with_a_hung_first_endpoint_starts_on_etcds_values(
    tmp_path: Path, etcd: EtcdServer, hung_endpoint: str
) -> None:
    etcd.etcdctl("put", "--", "/hotknob/t/config/train/lr", "0.5")
    endpoints = f"{hung_endpoint},{etcd.endpoint}"
    with DaemonProcess(tmp_path, endpoints=endpoints) as daemon:
        with RawClient(daemon.socket_path) as client:
            assert client.snapshot["values"]["train"]["lr"] == 0.5
        assert not daemon.events("etcd_unavailable_at_start")


# --- 4. an endpoint that answers, but not as etcd ----------------------------------------------


@pytest.fixture
def unimplemented_endpoint() -> Iterator[str]:
    """A gRPC server with no services: every call is answered UNIMPLEMENTED, as a proxy's
    HTTP 404 or a wrong port is."""
    with ThreadPoolExecutor(2) as pool:
        server = grpc.server(pool)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.stop(0).wait()


def test_reads_move_on_from_an_endpoint_that_answers_with_another_error(
    store: EtcdStore, etcd: EtcdServer, unimplemented_endpoint: str
) -> None:
    revision = store.put(P + "train/lr", "0.5")
    opts = EtcdOptions(endpoints=(unimplemented_endpoint, etcd.endpoint), timeout=3.0)
    for _ in range(8):  # the client picks its first endpoint at random
        other = EtcdStore(opts)
        try:
            assert other.read_prefix(P) == ({P + "train/lr": b"0.5"}, revision)
            assert other.current_revision() == revision
        finally:
            other.close()


# --- 5. an auth token that expires under an idle watch ------------------------------------------


@pytest.mark.slow
def test_an_expired_token_is_renewed_without_breaking_the_watch() -> None:
    with EtcdServer(extra_args=["--auth-token", "simple", "--auth-token-ttl", "2"]) as etcd:
        etcd.etcdctl("user", "add", "root", "--new-user-password", "rootpw")
        etcd.etcdctl("user", "grant-role", "root", "root")
        etcd.etcdctl("auth", "enable")
        opts = EtcdOptions(endpoints=(etcd.endpoint,), user="root", password="rootpw")
        rec = Recorder()
        # Probes come after 3.5 s of silence, by when the 2 s token has expired.
        with watch(rec, opts, hung_after=3.5) as w:
            assert w.wait_ready(10)
            time.sleep(8.0)
            etcd.etcdctl("--user", "root:rootpw", "put", "--", P + "train/lr", "0.2")
            rec.wait(lambda: bool(rec.changes), timeout=5)
            assert rec.changes[-1].puts == {P + "train/lr": b"0.2"}
            assert [up for up, _ in rec.connection] == [True]
            assert w.last_revision == rec.changes[-1].revision


# --- 6. an etcd out of space ---------------------------------------------------------------------


def test_an_etcd_out_of_space_is_named_and_nothing_is_lost_once_it_is_freed(
    tmp_path: Path,
) -> None:
    """Past its quota etcd refuses every write (its NOSPACE alarm). ``set`` and the daemon's
    status publisher say so in words that name the cause, not "cannot reach etcd"; the
    daemon serves on, and once an operator frees etcd the next change lands."""
    with EtcdServer(extra_args=["--quota-backend-bytes", str(4 * MIB)]) as etcd:
        store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)))
        env = {"HOTKNOB_ETCD_ENDPOINTS": etcd.endpoint}
        try:
            with (
                DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
                RawClient(daemon.socket_path) as client,
            ):
                blob = "x" * (256 * 1024)
                with pytest.raises(NoSpaceError) as full:
                    for n in range(200):
                        store.commit({f"/junk/{n}": blob}, [])
                assert "out of space" in str(full.value)
                assert "NOSPACE" in str(full.value)

                done = run_cli("set", "--app", "t", "train.lr=0.3", env=env)
                assert done.returncode == 3, done.stderr
                assert done.stderr.count("\n") == 1
                assert "is out of space" in done.stderr
                assert "cannot reach" not in done.stderr

                version = client.snapshot["version"]
                client.send({"type": "applied", "version": version, "step": 1})
                deadline = time.monotonic() + 10
                while not daemon.events("status_publish_failed"):
                    assert time.monotonic() < deadline, daemon.log()
                    time.sleep(0.05)
                assert "is out of space" in daemon.events("status_publish_failed")[0]["error"]
                assert client.no_message(0.3)

                etcd.etcdctl("del", "--prefix", "/junk/")  # a plain delete is still taken
                store.compact(store.current_revision())
                etcd.etcdctl("defrag")
                etcd.etcdctl("alarm", "disarm")
                done = run_cli("set", "--app", "t", "train.lr=0.3", env=env)
                assert done.returncode == 0, done.stderr
                update = client.next_update()
                assert update["changed"] == {"train.lr": 0.3}
        finally:
            store.close()


def test_a_transaction_over_etcds_operation_limit_is_named() -> None:
    """etcd refuses a transaction of more operations than its ``--max-txn-ops``: ``set``
    says which limit, in one line, and writes nothing."""
    with EtcdServer(extra_args=["--max-txn-ops", "3"]) as etcd:
        env = {"HOTKNOB_ETCD_ENDPOINTS": etcd.endpoint}
        keys = ["train.lr=0.1", "train.momentum=0.5", "train.weight_decay=0.01"]
        done = run_cli("set", "--app", "t", *keys, env=env)  # three keys and who wrote them
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1
        assert "too many operations" in done.stderr and "--max-txn-ops" in done.stderr
        assert etcd.etcdctl("get", "--prefix", "/hotknob/t/").stdout == ""
        assert run_cli("set", "--app", "t", *keys[:2], env=env).returncode == 0
