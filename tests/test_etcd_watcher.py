"""EtcdWatcher against a real etcd: grouping, no gaps, restarts, compaction, a hung server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from hotknob.daemon.etcd_store import EtcdChange, EtcdOptions, EtcdStore
from hotknob.daemon.etcd_watcher import Backoff, EtcdWatcher
from tests.etcd_server import EtcdCluster, EtcdServer, free_port

P = "/hotknob/test/config/"
DEADLINE = 15.0  # only against hangs; no test asserts speed except the hung-server bound


@dataclass
class Recorder:
    """Collects every callback; ``wait`` blocks until a predicate over it holds."""

    snapshots: list[tuple[dict[str, bytes], int]] = field(default_factory=list)
    changes: list[EtcdChange] = field(default_factory=list)
    connection: list[tuple[bool, str]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def on_snapshot(self, values: dict[str, bytes], revision: int) -> None:
        with self.cond:
            self.snapshots.append((values, revision))
            self.cond.notify_all()

    def on_change(self, change: EtcdChange) -> None:
        with self.cond:
            self.changes.append(change)
            self.cond.notify_all()

    def on_connection(self, connected: bool, detail: str) -> None:
        with self.cond:
            self.connection.append((connected, detail))
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"timed out; saw {self!r}"


def options(*endpoints: str) -> EtcdOptions:
    return EtcdOptions(endpoints=endpoints, timeout=2.0)


@pytest.fixture
def store(etcd: EtcdServer) -> Iterator[EtcdStore]:
    s = EtcdStore(options(etcd.endpoint))
    yield s
    s.close()


def watch(rec: Recorder, opts: EtcdOptions, **kw: object) -> EtcdWatcher:
    return EtcdWatcher(
        opts,
        P,
        on_snapshot=rec.on_snapshot,
        on_change=rec.on_change,
        on_connection=rec.on_connection,
        backoff_max=0.3,
        **kw,
    )


def test_backoff_is_capped_and_jittered() -> None:
    b = Backoff(0.1, 1.0)
    delays = [b.next() for _ in range(8)]
    assert 0.05 <= delays[0] <= 0.1 and all(0.5 <= d <= 1.0 for d in delays[4:])
    b.reset()
    assert b.next() <= 0.1


def test_snapshot_then_put_txn_and_delete_each_arrive_as_one_change(
    etcd: EtcdServer, store: EtcdStore
) -> None:
    store.put(P + "train/lr", "0.1")
    rec = Recorder()
    with watch(rec, options(etcd.endpoint)) as w:
        assert w.wait_ready(DEADLINE)
        assert rec.snapshots == [({P + "train/lr": b"0.1"}, store.current_revision())]
        r1 = store.put(P + "train/lr", "0.2")
        etcd.etcdctl("txn", input=f"\nput {P}a 1\nput {P}b 2\n\n\n")
        store.commit({}, [P + "a"])
        rec.wait(lambda: len(rec.changes) == 3)
        assert rec.changes[0] == EtcdChange(r1, {P + "train/lr": b"0.2"}, frozenset())
        assert rec.changes[1] == EtcdChange(r1 + 1, {P + "a": b"1", P + "b": b"2"}, frozenset())
        assert rec.changes[2] == EtcdChange(r1 + 2, {}, frozenset({P + "a"}))
        assert w.last_revision == r1 + 2
        assert rec.connection == [(True, rec.connection[0][1])]


def test_write_between_snapshot_read_and_watch_start_is_delivered(
    etcd: EtcdServer, store: EtcdStore
) -> None:
    rec = Recorder()

    def on_snapshot(values: dict[str, bytes], revision: int) -> None:
        rec.on_snapshot(values, revision)
        if len(rec.snapshots) == 1:  # runs after the read, before the watch starts
            store.put(P + "racy", "1")

    w = EtcdWatcher(options(etcd.endpoint), P, on_snapshot=on_snapshot, on_change=rec.on_change)
    with w:
        rec.wait(lambda: len(rec.changes) == 1)
        assert rec.changes[0].puts == {P + "racy": b"1"}
        assert rec.changes[0].revision == rec.snapshots[0][1] + 1


def test_sigkill_and_restart_during_puts_delivers_every_revision_once(
    etcd: EtcdServer, store: EtcdStore
) -> None:
    rec = Recorder()
    written: list[tuple[int, bytes]] = []
    with watch(rec, options(etcd.endpoint)) as w:
        assert w.wait_ready(DEADLINE)
        for i in range(10):
            written.append((store.put(P + "step", str(i)), str(i).encode()))
        etcd.kill()
        etcd.restart()
        writer = EtcdStore(options(etcd.endpoint))
        try:
            for i in range(10, 20):
                written.append((writer.put(P + f"k{i % 3}", str(i)), str(i).encode()))
        finally:
            writer.close()
        rec.wait(lambda: w.last_revision == written[-1][0])
        got = [(c.revision, next(iter(c.puts.values()))) for c in rec.changes]
        assert got == written
        assert [c for c, _ in rec.connection][-2:] == [False, True]
        assert len(rec.snapshots) == 1


def test_compaction_while_the_watcher_is_behind_resyncs_with_full_state(
    etcd: EtcdServer, store: EtcdStore
) -> None:
    store.commit({P + "keep": "1", P + "drop": "1"})
    rec = Recorder()
    release = threading.Event()

    def on_change(change: EtcdChange) -> None:
        rec.on_change(change)
        release.wait(DEADLINE)  # hold the watcher back while etcd moves on

    w = EtcdWatcher(
        options(etcd.endpoint),
        P,
        on_snapshot=rec.on_snapshot,
        on_change=on_change,
        on_connection=rec.on_connection,
        backoff_max=0.3,
    )
    with w:
        assert w.wait_ready(DEADLINE)
        store.put(P + "keep", "2")
        rec.wait(lambda: len(rec.changes) == 1)
        etcd.kill()  # the stream breaks while the watcher is busy
        etcd.restart()
        writer = EtcdStore(options(etcd.endpoint))
        try:
            writer.put(P + "keep", "3")
            writer.commit({P + "new": "x"}, [P + "drop"])
            writer.compact(writer.put("/unrelated", "y"))
            expected = writer.read_prefix(P)
        finally:
            writer.close()
        release.set()
        rec.wait(lambda: len(rec.snapshots) == 2)
        assert rec.snapshots[1] == expected
        assert rec.snapshots[1][0] == {P + "keep": b"3", P + "new": b"x"}
        assert len(rec.changes) == 1  # nothing from the compacted range was replayed
        r = store.put(P + "after", "1")
        rec.wait(lambda: w.last_revision == r)
        assert rec.changes[-1].puts == {P + "after": b"1"}


@pytest.mark.slow
def test_hung_server_is_detected_and_recovered(etcd: EtcdServer, store: EtcdStore) -> None:
    rec = Recorder()
    with watch(rec, options(etcd.endpoint), hung_after=1.5) as w:
        assert w.wait_ready(DEADLINE)
        etcd.pause()
        try:
            paused_at = time.monotonic()
            rec.wait(lambda: any(not up for up, _ in rec.connection), timeout=12.0)
            assert time.monotonic() - paused_at < 10.0
        finally:
            etcd.resume()
        rec.wait(lambda: rec.connection[-1][0] is True)
        r = store.put(P + "after", "1")
        rec.wait(lambda: w.last_revision == r)
        assert rec.changes[-1] == EtcdChange(r, {P + "after": b"1"}, frozenset())


def test_unreachable_at_start_reports_and_stops_cleanly() -> None:
    rec = Recorder()
    w = watch(rec, EtcdOptions(endpoints=(f"127.0.0.1:{free_port()}",), timeout=0.5))
    w.start()
    rec.wait(lambda: bool(rec.connection))
    assert rec.connection[0][0] is False and "cannot reach etcd" in rec.connection[0][1]
    assert not w.wait_ready(0.1)
    w.stop()
    w.stop()
    assert rec.snapshots == []
    with pytest.raises(RuntimeError):
        w.start()
    unstarted = watch(rec, EtcdOptions(endpoints=("127.0.0.1:1",)))
    unstarted.stop()
    unstarted.stop()


def test_starts_when_etcd_arrives_later(etcd: EtcdServer) -> None:
    etcd.stop()
    rec = Recorder()
    with watch(rec, options(etcd.endpoint)) as w:
        rec.wait(lambda: bool(rec.connection))
        etcd.restart()
        assert w.wait_ready(DEADLINE)
        assert rec.snapshots[0][0] == {}


@pytest.mark.slow
def test_cluster_member_killed_watcher_moves_to_another_endpoint() -> None:
    with EtcdCluster(3) as cluster:
        first = cluster.members[0]
        rec = Recorder()
        with watch(rec, options(*cluster.endpoints)) as w:
            assert w.wait_ready(DEADLINE)
            rec.wait(lambda: bool(rec.connection))
            assert first.endpoint in rec.connection[0][1]
            first.kill()
            writer = EtcdStore(options(*cluster.endpoints[1:]))
            try:
                deadline = time.monotonic() + DEADLINE
                while True:  # the survivors may be electing a leader
                    try:
                        r = writer.put(P + "x", "1")
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
            finally:
                writer.close()
            rec.wait(lambda: w.last_revision >= r)
            assert rec.changes[-1].puts == {P + "x": b"1"}
            assert rec.connection[-1][0] is True
            assert first.endpoint not in rec.connection[-1][1]
