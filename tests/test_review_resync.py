"""A full read of etcd (a resync once the history the daemon missed was compacted) and the
values it refused before, against real etcd and a real daemon cut off from it by a relay.

Each resync refused again a value etcd still held, refused and reported before and not
written since, and reported it as a new ``change_rejected`` (the log and ``watch``): a new
bad write, to whoever reads them. The refusal stays in force all the same: ``/healthz``
and the status entries (what ``status`` shows) say so, and a value written again, or a
new bad one written while the daemon was cut off, is reported.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.status_entries import status_entries
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer, free_port
from tests.test_etcd_recovery import Relay
from tests.test_rollout import Acking

pytestmark = pytest.mark.timeout(60)

APP = "t"
CONFIG = f"/hotknob/{APP}/config/"
TEMPERATURE = CONFIG + "sampling/temperature"
KEY = "sampling.temperature"


def until(what: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)
    return found


@dataclass
class Node:
    """A daemon on etcd through ``relay``, with one acking process (``p1``), a ``watch``
    session and ``/healthz`` and ``/metrics`` on ``port``."""

    etcd: EtcdServer
    store: EtcdStore
    relay: Relay
    daemon: DaemonProcess
    watcher: RawClient
    port: int

    def events_until(self, revision: int) -> list[tuple[str, int]]:
        """The watch session's change events, up to the acceptance of ``revision`` (or of a
        full read at or past it: status entries are written to etcd too)."""
        seen: list[tuple[str, int]] = []
        while not any(e == "change_accepted" and r >= revision for e, r in seen):
            message = self.watcher.next(timeout=20)
            if message.get("event") in ("change_accepted", "change_rejected"):
                seen.append((message["event"], message["revision"]))
        return seen

    def rejected(self, value: str) -> tuple[int, list[tuple[str, int]]]:
        revision = self.store.put(TEMPERATURE, value)
        marker = self.store.put(CONFIG + "train/warmup_steps", str(revision))
        return revision, self.events_until(marker)

    def resync(self, *during: tuple[str, str]) -> tuple[int, list[tuple[str, int]]]:
        """Cut the daemon off, write ``during`` and a change it takes, compact etcd past
        them and let it back: it must read etcd in full. Returns the taken change's
        revision and the watch session's events up to its acceptance."""
        resyncs = len(self.daemon.events("etcd_resync"))
        self.relay.cut()
        for path, value in during:
            self.store.put(CONFIG + path, value)
        taken = self.store.put(CONFIG + "train/lr", f"0.0{resyncs + 1}")
        self.etcd.etcdctl("compact", str(taken))
        self.relay.restore()
        events = self.events_until(taken)
        assert len(self.daemon.events("etcd_resync")) > resyncs, self.daemon.log()
        return taken, events

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=10) as r:
            return json.loads(r.read())

    def rejected_count(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        line = 'hotknob_changes_rejected_total{layer="etcd"} '
        return float(next(x for x in text.splitlines() if x.startswith(line))[len(line) :])

    def entry(self) -> dict[str, Any]:
        kvs, _ = self.store.read_prefix(f"/hotknob/{APP}/status/")
        return status_entries(APP, kvs).get("n1/p1", {})


@contextmanager
def node(etcd: EtcdServer, tmp_path: Path) -> Iterator[Node]:
    with ExitStack() as stack:
        relay = Relay(etcd.client_port)
        stack.callback(relay.close)
        store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
        stack.callback(store.close)
        port = free_port()
        daemon = DaemonProcess(
            tmp_path / "n1",
            app=APP,
            endpoints=relay.endpoint,
            extra=["--node", "n1", "--metrics-addr", f"127.0.0.1:{port}"],
        )
        stack.enter_context(daemon)
        stack.enter_context(Acking(daemon, "p1"))
        watcher = stack.enter_context(RawClient(daemon.socket_path, "w", watch=True))
        yield Node(etcd, store, relay, daemon, watcher, port)


def test_a_resync_does_not_report_again_a_refusal_unchanged_since(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """-3 refused (the daemon runs 0.7): two resyncs later, it was reported once, in the log
    and to ``watch``, and counted once; it is still in force in ``/healthz`` and the
    status entry, and the value kept is not said again either."""
    with node(etcd, tmp_path) as n1:
        n1.store.put(TEMPERATURE, "0.7")
        bad, events = n1.rejected("-3")
        assert ("change_rejected", bad) in events, events
        for _ in range(2):
            taken, events = n1.resync()
            assert not [e for e in events if e[0] == "change_rejected"], events
        logged = n1.daemon.events("change_rejected")
        assert [e["revision"] for e in logged] == [bad], logged
        assert not n1.daemon.events("etcd_value_kept"), n1.daemon.log()
        assert n1.rejected_count() == 1
        health = n1.health()
        assert health["rejected"]["keys"] == [KEY] and health["revision"] >= taken, health
        entry = until(lambda: (e := n1.entry()).get("revision", 0) >= taken and e)
        assert entry["rejected"]["keys"] == [KEY], entry
        with RawClient(n1.daemon.socket_path, "late") as late:
            assert late.snapshot["values"]["sampling"]["temperature"] == 0.7, late.snapshot


def test_a_value_written_again_or_a_new_bad_one_is_reported(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """-3 refused, then 0.5 taken, then -3 again: a new write, reported again; and so is
    -4, written while the daemon was cut off and read in full after a compaction, and -3
    once more then: each full read refuses another value than the one refused last."""
    with node(etcd, tmp_path) as n1:
        n1.rejected("-3")
        n1.store.put(TEMPERATURE, "0.5")
        again, events = n1.rejected("-3")
        assert ("change_rejected", again) in events, events
        for value in ("-4", "-3"):
            taken, events = n1.resync(("sampling/temperature", value))
            refused = [r for e, r in events if e == "change_rejected"]
            assert len(refused) == 1 and refused[0] >= taken, events
        taken, events = n1.resync()
        assert not [e for e in events if e[0] == "change_rejected"], events
        logged = [(e["revision"], e["new"][KEY]) for e in n1.daemon.events("change_rejected")]
        assert [value for _, value in logged] == [-3, -3, -4, -3], logged
        assert n1.rejected_count() == 4
        assert n1.health()["rejected"]["keys"] == [KEY]
