"""A daemon on a three-member etcd cluster loses the member it talks to, and carries on.

A real ``hotknob run`` is given all three endpoints, the member it watches
through first. While a stream of changes is put through the other members, that
member is SIGKILLed (the leader: the cluster also elects a new one) or SIGSTOPped
(hung: its sockets stay open and silent). A raw protocol client that subscribed
to events must see every put accepted exactly once, in order, with consecutive
versions; its updates (which the daemon coalesces in a catch-up burst, by design)
must come in order and end with the cluster's state. The time to recover is
printed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdCluster, EtcdServer

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

APP = "t"
P = f"/hotknob/{APP}/config/"
PUTS = 24
GAP_S = 0.05
BREAK_AFTER = 6  # the member goes away after this many puts
DEADLINE_S = 30.0


@dataclass
class Received:
    """Updates and ``change_accepted`` events as the client read them, with arrival times."""

    updates: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: BaseException | None = None

    def accepted_lrs(self) -> list[float]:
        with self.lock:
            return [e["changed"]["train.lr"] for _, e in self.accepted]

    def arrival_of(self, lr: float) -> float | None:
        with self.lock:
            return next((t for t, e in self.accepted if e["changed"]["train.lr"] == lr), None)


@contextmanager
def reading(client: RawClient) -> Iterator[Received]:
    """Read the client's updates on a thread for the ``with`` block; joined at its end."""
    got = Received()
    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.is_set():
                try:
                    message = client.next(timeout=0.1)
                except TimeoutError:
                    continue
                with got.lock:
                    if message["type"] == "update":
                        got.updates.append(message)
                    elif message.get("event") == "change_accepted":
                        got.accepted.append((time.monotonic(), message))
        except BaseException as exc:  # reported by the test
            got.error = exc

    thread = threading.Thread(target=run, name="test-reader")
    thread.start()
    try:
        yield got
    finally:
        stop.set()
        thread.join()


def put_until_accepted(writer: EtcdStore, lr: float) -> int:
    """Put through the survivors, retrying while they elect a leader; the revision.

    A put that failed may still have landed; its retry then writes the same value,
    which changes nothing, so the daemon sees that value once.
    """
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            return writer.put(P + "train/lr", json.dumps(lr))
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_scenario(
    cluster: EtcdCluster,
    watched: EtcdServer,
    tmp_path: Path,
    break_member: Callable[[EtcdServer], None],
) -> tuple[float, float]:
    """Stream puts, break ``watched`` midway, check delivery; (recover_s, first_put_lag_s)."""
    others = [m for m in cluster.members if m is not watched]
    endpoints = ",".join([watched.endpoint, *(m.endpoint for m in others)])
    watched.etcdctl("put", P + "train/lr", "0.5")
    lrs = [round(0.001 * (i + 1), 6) for i in range(PUTS)]
    writer = EtcdStore(EtcdOptions(endpoints=tuple(m.endpoint for m in others), timeout=2.0))
    try:
        with (
            DaemonProcess(tmp_path, app=APP, endpoints=endpoints) as daemon,
            RawClient(daemon.socket_path, watch=True) as client,
            reading(client) as got,
        ):
            first_version = client.snapshot["version"]
            assert client.snapshot["values"]["train"]["lr"] == 0.5
            broken_at = 0.0
            put_done: dict[float, float] = {}
            for i, lr in enumerate(lrs):
                if i == BREAK_AFTER:
                    broken_at = time.monotonic()
                    break_member(watched)
                put_until_accepted(writer, lr)
                put_done[lr] = time.monotonic()
                time.sleep(GAP_S)
            deadline = time.monotonic() + DEADLINE_S
            while got.arrival_of(lrs[-1]) is None:
                assert got.error is None, got.error
                assert time.monotonic() < deadline, f"never got the last: {got.accepted_lrs()}"
                time.sleep(0.02)
            time.sleep(0.3)  # a repeated delivery would show up now
            cluster_lr = json.loads(writer.read_prefix(P)[0][P + "train/lr"])
        assert got.error is None, got.error
        with got.lock:
            accepted = [e for _, e in got.accepted]
            updates = list(got.updates)
    finally:
        writer.close()

    assert [e["changed"]["train.lr"] for e in accepted] == lrs, "a change was lost or repeated"
    versions = [e["version"] for e in accepted]
    assert versions == list(range(first_version + 1, first_version + 1 + PUTS))
    revisions = [e["revision"] for e in accepted]
    assert revisions == sorted(set(revisions))
    assert [u["version"] for u in updates] == sorted({u["version"] for u in updates})
    seen = [u["values"]["train"]["lr"] for u in updates]
    assert seen == [lr for lr in lrs if lr in seen], "updates out of order"
    assert updates[-1]["version"] == versions[-1]
    assert updates[-1]["values"]["train"]["lr"] == cluster_lr == lrs[-1]
    first_after = lrs[BREAK_AFTER]
    arrived = got.arrival_of(first_after)
    assert arrived is not None
    return arrived - broken_at, arrived - put_done[first_after]


def test_leader_killed_while_changes_flow(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    leader = etcd_cluster.leader()
    recover, lag = run_scenario(etcd_cluster, leader, tmp_path, EtcdServer.kill)
    print(f"\nleader SIGKILL: first change after the kill delivered {recover:.2f} s after it "
          f"({lag * 1000:.0f} ms after its put was accepted)")  # fmt: skip


def test_member_hung_while_changes_flow(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    leader = etcd_cluster.leader()
    follower = next(m for m in etcd_cluster.members if m is not leader)
    recover, lag = run_scenario(etcd_cluster, follower, tmp_path, EtcdServer.pause)
    print(f"\nmember SIGSTOP: first change after the hang delivered {recover:.2f} s after it "
          f"({lag * 1000:.0f} ms after its put was accepted)")  # fmt: skip


def test_with_credentials_one_dead_member_does_not_fail_a_new_client(
    etcd_cluster: EtcdCluster,
) -> None:
    """The client authenticates on a member it picks at random, with no fail-over: a dead
    one is tried again rather than failing the command or the daemon's reconnect."""
    leader = etcd_cluster.leader()
    leader.etcdctl("user", "add", "root", "--new-user-password", "rootpw")
    leader.etcdctl("user", "grant-role", "root", "root")
    leader.etcdctl("auth", "enable")
    leader.etcdctl("--user", "root:rootpw", "put", "/hotknob/t/config/train/lr", "0.5")
    dead = next(m for m in etcd_cluster.members if m is not leader)
    dead.kill()
    options = EtcdOptions(endpoints=tuple(etcd_cluster.endpoints), user="root", password="rootpw")
    for _ in range(10):  # each a new client: a new random pick
        store = EtcdStore(options)
        try:
            values, _ = store.read_prefix("/hotknob/t/config/")
        finally:
            store.close()
        assert values == {"/hotknob/t/config/train/lr": b"0.5"}
