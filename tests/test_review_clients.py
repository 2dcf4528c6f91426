"""Clients that misbehave, against a real daemon: each must cost the daemon a bounded
share of its loop, its memory and etcd, whatever it sends."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

from hotknob.config.keys import status_prefix
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.model_runtime import protocol
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer
from tests.live_trainer import wait_for

CHUNKS = 16  # of 64 KiB per flooder: a read takes up to 256 KiB, thousands of acks


def _ack_lines(version: int) -> bytes:
    line = protocol.encode(protocol.applied(version, 1))
    return line * (64 * 1024 // len(line))


def _acks(daemon: DaemonProcess) -> int:
    return daemon.log().count('"change_applied"')


def _flood(path: Path, name: str, ready: threading.Barrier) -> None:
    """Say hello, then send acks back to back, as fast as the daemon takes them."""
    with RawClient(path, name=name) as client:
        chunk = _ack_lines(client.snapshot["version"])
        ready.wait(10)
        for _ in range(CHUNKS):
            client.sock.sendall(chunk)


def test_a_client_flooding_acks_takes_turns_with_the_others(tmp_path: Path) -> None:
    """Two clients send acks as fast as they can; the daemon handles them in turns (each
    ack is a ``change_applied`` line at debug level), not one's buffered megabytes of
    acks in one go, which would hold the loop, and every other client, for a second."""
    daemon = DaemonProcess(tmp_path, extra=["--log-level", "debug"])
    with daemon:
        ready = threading.Barrier(2)
        flooders = [
            threading.Thread(target=_flood, args=(daemon.socket_path, name, ready), daemon=True)
            for name in ("flood-a", "flood-b")
        ]
        for thread in flooders:
            thread.start()
        for thread in flooders:
            thread.join(60)
        sent = 2 * CHUNKS * _ack_lines(0).count(b"\n")
        wait_for("the daemon to handle every ack", lambda: _acks(daemon) >= sent, 30)
        acks = [e["client"] for e in daemon.events("change_applied")]
    # Once one client has sent its last ack, the other's rest comes as one run: fairly.
    last = {name: len(acks) - 1 - acks[::-1].index(name) for name in set(acks)}
    both = acks[: min(last.values()) + 1]
    longest = max(len(list(run)) for _, run in itertools.groupby(both))
    # Unfair, a run is what one read brought: thousands of acks.
    assert longest < 1500, longest


def test_a_huge_rank_in_a_hello_stays_out_of_the_status_entry(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """``rank`` and ``world_size`` go into the process's status entry, rewritten at each
    ack: a ``hello`` that holds 600 kB there would put that into etcd at every one (a
    flood of acks: megabytes a second). Only integers are kept."""
    store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
    daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n"])
    try:
        with daemon:
            path = daemon.socket_path
            with (
                RawClient(path, name="huge", rank="r" * 600_000, world_size=[0] * 1000) as huge,
                RawClient(path, name="fine", rank=3, world_size=8) as fine,
            ):
                for client in (huge, fine):
                    client.send(protocol.applied(client.snapshot["version"], 1))
                entries = wait_for("both status entries", lambda: _entries(store, 2), 20)
    finally:
        store.close()
    by_client = {json.loads(raw)["client"]: raw for raw in entries.values()}
    assert len(by_client["huge"]) < 4096, len(by_client["huge"])
    huge_entry = json.loads(by_client["huge"])
    assert "rank" not in huge_entry and "world_size" not in huge_entry
    fine_entry = json.loads(by_client["fine"])
    assert (fine_entry["rank"], fine_entry["world_size"]) == (3, 8)


def _entries(store: EtcdStore, count: int) -> dict[str, bytes] | None:
    entries, _ = store.read_prefix(status_prefix("t"))
    return entries if len(entries) >= count else None
