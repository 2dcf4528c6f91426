"""Long runs, scaled down: what a client repeats for hours must cost the daemon nothing
that grows with the repeats (etcd writes, log lines)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from hotknob.config.keys import status_prefix
from hotknob.daemon.client_log import CLIENT_ERRORS_LOGGED
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.model_runtime import protocol
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer
from tests.live_trainer import wait_for

pytestmark = pytest.mark.timeout(60)

REPEAT_FOR_S = 0.8  # four times ``feedback.STATUS_EVERY_S``: a rewrite each, before the fix
JUNK_CONNECTIONS = 100
ERROR_WINDOW_S = 3.0


def _status_entry(store: EtcdStore, step: int) -> tuple[dict[str, object], int] | None:
    """The only status entry and etcd's revision, once the entry says ``step``."""
    entries, revision = store.read_prefix(status_prefix("t"))
    if len(entries) != 1:
        return None
    entry = json.loads(next(iter(entries.values())))
    return (entry, revision) if entry.get("step") == step else None


def test_the_same_ack_again_and_again_rewrites_no_status_entry(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A client that sends its ack of one version over and over (a loop gone wrong) says
    nothing new: etcd is written once for the first ack and once for the next real one,
    not every ``STATUS_EVERY_S`` while the repeats last (each a revision etcd keeps until
    its history is compacted)."""
    store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
    daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n"])
    try:
        with daemon, RawClient(daemon.socket_path, name="repeats") as client:
            version = client.snapshot["version"]
            client.send(protocol.applied(version, 1))
            _, before = wait_for("the first ack's entry", lambda: _status_entry(store, 1), 20)
            repeats = protocol.encode(protocol.applied(version, 1)) * 50
            until = time.monotonic() + REPEAT_FOR_S
            while time.monotonic() < until:
                client.sock.sendall(repeats)
                time.sleep(0.01)  # paced: repeats all along, not one read's worth
            client.send(protocol.applied(version, 2))  # new: the step it applied it at
            entry, after = wait_for("the next ack's entry", lambda: _status_entry(store, 2), 20)
    finally:
        store.close()
    assert entry["version"] == version
    assert after == before + 1, f"{after - before - 1} rewrites for repeats of one ack"


def _send_junk(path: Path) -> bytes:
    """Connect, send a line that is no JSON, and read until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"not json\n")
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
        return got


def test_a_client_reconnecting_with_junk_in_a_loop_does_not_fill_the_log(
    tmp_path: Path,
) -> None:
    """Each connection that sends junk gets its ``error`` line and is closed; the daemon
    logs ``client_error`` for the first of them only, and counts the rest in one
    ``client_errors_not_logged`` line, not one line per connection for as long as the
    loop runs."""
    window = f"import hotknob.daemon.client_log as c; c.CLIENT_ERROR_LOG_EVERY_S = {ERROR_WINDOW_S}"
    daemon = DaemonProcess(tmp_path, before_main=window)
    with daemon:
        began = time.monotonic()
        for _ in range(JUNK_CONNECTIONS):
            assert b'"type":"error"' in _send_junk(daemon.socket_path).replace(b" ", b"")
        took = time.monotonic() - began

        def told() -> tuple[int, int] | None:
            logged = len(daemon.events("client_error"))
            counted = sum(e["count"] for e in daemon.events("client_errors_not_logged"))
            return (logged, counted) if logged + counted >= JUNK_CONNECTIONS else None

        logged, counted = wait_for("every junk connection logged or counted", told, 20)
        # A client still gets through: its line is logged as before.
        with RawClient(daemon.socket_path, name="fine") as fine:
            assert fine.snapshot["type"] == "snapshot"
    assert logged + counted == JUNK_CONNECTIONS
    # Each window the loop reached may log its own allowance (a slow machine: more windows).
    windows = int(took // ERROR_WINDOW_S) + 1
    allowed = min(JUNK_CONNECTIONS, CLIENT_ERRORS_LOGGED * windows)
    assert logged <= allowed, (logged, counted, took)
    if allowed < JUNK_CONNECTIONS:
        assert counted >= JUNK_CONNECTIONS - allowed, (logged, counted, took)
    else:  # pragma: no cover - a machine so slow that no window filled up
        pytest.skip(f"100 connections took {took:.1f} s: no window filled up")
    [summary, *_] = daemon.events("client_errors_not_logged")
    assert summary["last_error"].startswith("line is not JSON"), summary
