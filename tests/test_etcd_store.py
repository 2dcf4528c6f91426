"""EtcdStore against a real etcd: reads, one-transaction commits, history, leases, errors."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from hotknob.config.errors import InvalidInput, Unavailable, UsageError
from hotknob.daemon.etcd_store import (
    AuthError,
    CompactedError,
    ConflictError,
    EtcdChange,
    EtcdOptions,
    EtcdStore,
    HistoryEntry,
    WatchItem,
    group_by_revision,
    parse_endpoint,
)
from tests.etcd_server import EtcdServer, free_port

P = "/hotknob/test/config/"


@pytest.fixture
def store(etcd: EtcdServer):
    s = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=3.0))
    yield s
    s.close()


def test_parse_endpoint_forms() -> None:
    assert parse_endpoint("10.0.0.1:2380") == ("10.0.0.1", 2380, None)
    assert parse_endpoint("http://etcd:2379") == ("etcd", 2379, False)
    assert parse_endpoint("https://etcd") == ("etcd", 2379, True)
    assert parse_endpoint("[::1]:4000") == ("::1", 4000, None)
    for bad in ("", "host:port", "host:0", "http://a/b:1"):
        with pytest.raises(UsageError):
            parse_endpoint(bad)


def test_options_from_strings_hides_password() -> None:
    opts = EtcdOptions.from_strings(" a:1, https://b:2 ,", user="u", password="s3cret")
    assert opts.endpoints == ("a:1", "https://b:2")
    assert "s3cret" not in repr(opts)
    with pytest.raises(UsageError):
        EtcdOptions.from_strings("a:1", user="u")


def test_group_by_revision_keeps_order_and_last_event_wins() -> None:
    changes = group_by_revision(
        [(7, "/a", b"1"), (7, "/b", b"2"), (8, "/a", None), (9, "/c", b"3"), (9, "/c", None)]
    )
    assert changes == [
        EtcdChange(7, {"/a": b"1", "/b": b"2"}, frozenset()),
        EtcdChange(8, {}, frozenset({"/a"})),
        EtcdChange(9, {}, frozenset({"/c"})),
    ]


def test_read_prefix_is_one_consistent_state(store: EtcdStore) -> None:
    r1 = store.commit({P + "train/lr": "0.1", P + "train/momentum": "0.9"})
    store.put("/elsewhere", "x")
    r2 = store.commit({P + "train/lr": "0.2"}, [P + "train/momentum"])
    values, rev = store.read_prefix(P)
    assert values == {P + "train/lr": b"0.2"}
    assert rev == r2 == store.current_revision()
    old, old_rev = store.read_prefix(P, revision=r1)
    assert old == {P + "train/lr": b"0.1", P + "train/momentum": b"0.9"}
    assert old_rev == r2  # the header tells the current revision, the data is as of r1


def test_commit_writes_all_keys_at_one_revision(store: EtcdStore, etcd: EtcdServer) -> None:
    rev = store.commit({P + "a": "1", P + "b": b"2"})
    out = etcd.etcdctl("get", "--prefix", P, "-w", "json").stdout
    assert out.count(f'"mod_revision":{rev}') == 2


def test_commit_with_failed_compare_raises_and_writes_nothing(store: EtcdStore) -> None:
    first = store.commit({P + "a": "1"})
    before = store.current_revision()
    with pytest.raises(ConflictError) as info:
        store.commit(
            {P + "a": "2", P + "b": "2"},
            expect_mod_revisions={P + "a": first - 1, P + "b": 0},
        )
    assert info.value.current == {P + "a": first}
    assert store.read_prefix(P)[0] == {P + "a": b"1"}
    assert store.current_revision() == before


def test_commit_mod_revision_zero_means_key_must_not_exist(store: EtcdStore) -> None:
    rev = store.commit({P + "new": "1"}, expect_mod_revisions={P + "new": 0})
    with pytest.raises(ConflictError):
        store.commit({P + "new": "2"}, expect_mod_revisions={P + "new": 0})
    assert store.commit({P + "new": "3"}, expect_mod_revisions={P + "new": rev}) == rev + 1


def test_commit_rejects_put_and_delete_of_one_key(store: EtcdStore) -> None:
    with pytest.raises(InvalidInput):
        store.commit({P + "a": "1"}, [P + "a"])


def test_history_of_a_key_with_deletes(store: EtcdStore) -> None:
    key = P + "train/lr"
    r1 = store.put(key, "0.1")
    store.put("/other", "noise")
    r2 = store.put(key, "0.2")
    r3 = store.commit({}, [key])
    store.put("/other", "noise2")
    r4 = store.put(key, "0.4")
    history = store.history(key, prefix=False, limit=10)
    assert history.entries == [
        HistoryEntry(key, b"0.4", r4),
        HistoryEntry(key, None, r3),
        HistoryEntry(key, b"0.2", r2),
        HistoryEntry(key, b"0.1", r1),
    ]
    assert not history.reached_compaction
    assert store.history(key, prefix=False, limit=2).entries == history.entries[:2]


def test_history_of_a_key_that_is_deleted_now(store: EtcdStore) -> None:
    key = P + "gone"
    r1 = store.put(key, "1")
    r2 = store.commit({}, [key])
    store.put(P + "other", "x")
    assert store.history(key, prefix=False, limit=5).entries == [
        HistoryEntry(key, None, r2),
        HistoryEntry(key, b"1", r1),
    ]
    assert store.history(P + "never", prefix=False, limit=5).entries == []


def test_history_of_a_prefix_groups_a_transaction(store: EtcdStore) -> None:
    r1 = store.commit({P + "a": "1", P + "b": "1"})
    r2 = store.commit({P + "a": "2"}, [P + "b"])
    entries = store.history(P, prefix=True, limit=10).entries
    assert entries == [
        HistoryEntry(P + "a", b"2", r2),
        HistoryEntry(P + "b", None, r2),
        HistoryEntry(P + "a", b"1", r1),
        HistoryEntry(P + "b", b"1", r1),
    ]


def test_history_whose_catch_up_fills_whole_batches(store: EtcdStore) -> None:
    # etcd cuts a watch's catch-up at 1,000 revisions and says nothing when none follow:
    # a history of exactly 1,000 changes, with a later write elsewhere, once waited for
    # a next batch until its timeout and failed as "cannot reach etcd".
    key = P + "train/lr"
    revs = [store.put(key, str(i)) for i in range(1000)]
    store.put("/other", "noise")
    history = store.history(key, prefix=False, limit=2000)
    assert [e.revision for e in history.entries] == revs[::-1]
    # Under a prefix a delete (of a key absent now) may follow a full batch whose last
    # change is the newest put: it is waited for and kept. 1,000 + 1 + 999 changes, then it.
    other = P + "train/momentum"
    store.put(other, "0.9")
    revs = [store.put(key, str(i)) for i in range(999)]
    gone = store.commit({}, [other])
    store.put("/other", "noise")
    entries = store.history(P, prefix=True, limit=5000).entries
    assert len(entries) == 2001
    assert entries[:3] == [
        HistoryEntry(other, None, gone),
        HistoryEntry(key, b"998", revs[-1]),
        HistoryEntry(key, b"997", revs[-2]),
    ]


def test_history_stops_cleanly_at_compaction(store: EtcdStore) -> None:
    key = P + "k"
    revs = [store.put(key, str(i)) for i in range(6)]
    store.compact(revs[3])
    history = store.history(key, prefix=False, limit=10)
    assert history.reached_compaction
    # the compaction point itself is still readable; nothing before it is reported
    assert [e.revision for e in history.entries] == [revs[5], revs[4], revs[3]]
    assert [e.value for e in history.entries] == [b"5", b"4", b"3"]
    with pytest.raises(CompactedError):
        store.read_prefix(P, revision=revs[1])
    # A key last written before the compaction point has its value in force as its one
    # entry: "(no history)" would say it never had one.
    other = P + "old"
    store.commit({other: "7"})
    before = store.put(key, "6")
    store.compact(before)
    history = store.history(other, prefix=False, limit=10)
    assert history.reached_compaction and history.entries[0].value == b"7"
    assert len(history.entries) == 1
    entries = store.history(P, prefix=True, limit=10).entries
    assert [(e.key, e.value) for e in entries] == [(key, b"6"), (other, b"7")]


def test_read_at_a_future_revision_is_invalid_input(store: EtcdStore) -> None:
    with pytest.raises(InvalidInput, match="future"):
        store.read_prefix(P, revision=store.current_revision() + 100)


def test_lease_lifecycle(store: EtcdStore) -> None:
    lease = store.grant_lease(30)
    store.put(P + "status/me", "alive", lease=lease)
    assert 0 < store.keepalive(lease) <= 30
    store.revoke(lease)
    assert store.read_prefix(P)[0] == {}
    assert store.keepalive(lease) == 0
    store.revoke(lease)  # idempotent


def test_watch_prefix_from_a_revision_and_after_compaction(store: EtcdStore) -> None:
    _, start = store.read_prefix(P)
    rev = store.commit({P + "a": "1", P + "b": "2"})
    got: queue.SimpleQueue[WatchItem] = queue.SimpleQueue()
    store.watch_prefix(P, start + 1, got.put)
    assert got.get(timeout=5) == [EtcdChange(rev, {P + "a": b"1", P + "b": b"2"}, frozenset())]
    store.put(P + "a", "2")
    store.compact(store.put(P + "a", "3"))
    compacted: queue.SimpleQueue[WatchItem] = queue.SimpleQueue()
    store.watch_prefix(P, start + 1, compacted.put)
    item = compacted.get(timeout=5)
    assert isinstance(item, CompactedError)
    assert item.compact_revision == rev + 2


def test_a_watch_sees_a_put_at_once_and_nothing_after_the_store_closes(store: EtcdStore) -> None:
    _, start = store.read_prefix(P)
    got: queue.SimpleQueue[WatchItem] = queue.SimpleQueue()
    store.watch_prefix(P, start + 1, got.put)
    rev = store.put(P + "a", "1")
    assert got.get(timeout=5) == [EtcdChange(rev, {P + "a": b"1"}, frozenset())]
    rev = store.commit({}, [P + "a"])
    assert got.get(timeout=5) == [EtcdChange(rev, {}, frozenset({P + "a"}))]
    watching = {t for t in threading.enumerate() if t.name.startswith("hotknob-etcd-watch")}
    assert watching
    store.close()  # cancels the watch: no error is delivered for it
    for thread in watching:
        thread.join(5)
        assert not thread.is_alive()
    with pytest.raises(queue.Empty):
        got.get(timeout=0.3)


def test_closing_the_store_while_a_watch_is_being_opened() -> None:
    """A hung member never answers a watch's creation; a close meanwhile (a stop, or the
    watcher giving the member up) ends the opening at once, with an error, and raises
    nothing itself (it once tried to join the watch's thread before it had started)."""
    with EtcdServer() as etcd:
        store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=20.0))
        store.read_prefix(P)  # connected
        outcome: list[BaseException | None] = []

        def open_watch() -> None:
            try:
                store.watch_prefix(P, 0, lambda item: None)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        etcd.pause()
        try:
            for delay in (0.0, 0.001, 0.01, 0.2):
                opener = threading.Thread(target=open_watch)
                opener.start()
                time.sleep(delay)
                store.close()
                opener.join(10)
                assert not opener.is_alive(), "the opening did not end with the close"
                assert isinstance(outcome[-1], Unavailable), outcome[-1]
                store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=20.0))
        finally:
            etcd.resume()
            store.close()


def test_a_watch_etcd_refuses_is_an_auth_error_not_a_silent_one() -> None:
    """etcd answers a watch of keys the user may not read by cancelling it at once
    (``permission denied``); the client library's watcher dropped that reason and its
    watch waited for ever. Here it is the error it is."""
    with EtcdServer() as etcd:
        etcd.etcdctl("user", "add", "root:rootpw")
        etcd.etcdctl("user", "grant-role", "root", "root")
        etcd.etcdctl("role", "add", "t-only")
        etcd.etcdctl("role", "grant-permission", "t-only", "--prefix=true", "read", P)
        etcd.etcdctl("user", "add", "app:apppw")
        etcd.etcdctl("user", "grant-role", "app", "t-only")
        etcd.etcdctl("auth", "enable")
        store = EtcdStore(
            EtcdOptions(endpoints=(etcd.endpoint,), user="app", password="apppw", timeout=3.0)
        )
        try:
            got: queue.SimpleQueue[WatchItem] = queue.SimpleQueue()
            store.watch_prefix(P, 0, got.put)  # its own prefix: allowed
            with pytest.raises(AuthError) as info:
                store.watch_prefix("/hotknob/other/", 0, got.put)
            assert "permission denied" in str(info.value)
            assert "apppw" not in str(info.value)
        finally:
            store.close()


def test_unreachable_endpoint_is_one_clear_line_without_password() -> None:
    port = free_port()
    opts = EtcdOptions(endpoints=(f"127.0.0.1:{port}",), user="root", password="hunter2",
                       timeout=1.0)  # fmt: skip
    store = EtcdStore(opts)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        store.read_prefix(P)
    assert time.monotonic() - started < 10  # a generous bound only against a hang
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "\n" not in message
    assert "hunter2" not in message and "hunter2" not in repr(store)
    store.close()


def test_closed_store_raises_unavailable(store: EtcdStore) -> None:
    store.put(P + "a", "1")
    store.close()
    with pytest.raises(Unavailable):
        store.read_prefix(P)


def test_auth_wrong_password_and_token_expiry() -> None:
    with EtcdServer(extra_args=("--auth-token", "simple", "--auth-token-ttl", "1")) as etcd:
        etcd.etcdctl("user", "add", "root:rootpw")
        etcd.etcdctl("auth", "enable")
        bad = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), user="root", password="nope"))
        with pytest.raises(AuthError) as info:
            bad.read_prefix(P)
        assert "nope" not in str(info.value)
        bad.close()
        good = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), user="root", password="rootpw"))
        try:
            good.put(P + "a", "1")
            time.sleep(2.5)  # the simple token expires after its TTL without use
            assert good.read_prefix(P)[0] == {P + "a": b"1"}
        finally:
            good.close()


def test_an_ipv6_endpoint_reaches_etcd() -> None:
    """``[::1]:port``: gRPC needs the brackets, which the client library's endpoint left
    out (it dialled ``::1:port`` and timed out)."""
    port = free_port()
    urls = f"http://127.0.0.1:{port},http://[::1]:{port}"
    server = EtcdServer(client_port=port, extra_args=["--listen-client-urls", urls])
    server.start()
    try:
        s = EtcdStore(EtcdOptions(endpoints=(f"[::1]:{port}",), timeout=3.0))
        try:
            s.put(P + "train/lr", "0.5")
            values, _ = s.read_prefix(P)
            assert values == {P + "train/lr": b"0.5"}
        finally:
            s.close()
    finally:
        server.stop()


_RACE = """
import random, sys, threading, time
import pyetcd
from pyetcd import exceptions as etcd_exc
from hotknob.daemon.etcd_client import ClosableClient
from hotknob.daemon.etcd_stream import watch_request

outcomes = {"made": 0, "refused": 0}
for _ in range(int(sys.argv[1])):
    client = ClosableClient([pyetcd.Endpoint("127.0.0.1", 1, secure=False)], timeout=1)

    def make() -> None:
        time.sleep(random.uniform(0, 0.0005))
        try:
            for name in ("kvstub", "leasestub", "authstub", "clusterstub", "maintenancestub"):
                getattr(client, name)
            client.start_watch(watch_request("/x/", None, 0)).cancel()
            outcomes["made"] += 1
        except etcd_exc.ConnectionFailedError:
            outcomes["refused"] += 1

    thread = threading.Thread(target=make)
    thread.start()
    time.sleep(random.uniform(0, 0.0005))
    client.close()
    thread.join()
print(outcomes["made"], outcomes["refused"])
"""


def test_closing_the_client_while_another_thread_makes_its_stubs_never_crashes() -> None:
    """gRPC ends the whole process with a segmentation fault when a stub is made from a
    channel another thread just closed (a daemon stopped while its start waited for etcd
    did, now and then). The same race, a few hundred times, in a process of its own: it
    ends normally, each stub made before the close or refused after it."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _RACE, "400"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    made, refused = map(int, done.stdout.split())
    assert made + refused == 400


def test_a_closed_client_refuses_to_make_a_stub() -> None:
    import pyetcd
    from pyetcd import exceptions as etcd_exc

    from hotknob.daemon.etcd_client import ClosableClient

    client = ClosableClient([pyetcd.Endpoint("127.0.0.1", 1, secure=False)], timeout=1)
    assert client.kvstub is client.kvstub  # made once, kept
    client.close()
    with pytest.raises(etcd_exc.ConnectionFailedError):
        client.leasestub  # noqa: B018 - the property makes the stub
    with pytest.raises(etcd_exc.ConnectionFailedError):
        client.start_watch(None)
