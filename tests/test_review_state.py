"""The daemon's own state across restarts, driven with real ``hotknob run`` daemons: a
state file no parser can take, counts beyond what the protocol carries, a FIFO where a
state, lock or socket lock file should be, a file in place of the state dir, and a
SIGKILL while etcd changes stream in.

Real daemons in child processes (``DaemonProcess``), a real etcd, real files.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.state import StateStore
from hotknob.model_runtime.protocol import MAX_INT
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(60)

P = "/hotknob/t/config/"


def config(path: Path, lr: float) -> Path:
    path.write_text(f"train:\n  lr: {lr}\n")
    return path


def state_text(**fields: object) -> str:
    state = {
        "format": 1,
        "version": 7,
        "revision": 3,
        "values": {},
        "etcd": {},
        "files": [],
        "saved_at": 1.0,
        "version_ceiling": 1007,
        "clean": False,
    }
    state.update(fields)
    return json.dumps(state)


# --- state files no daemon can go on from ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * 100_000, "nested too deep"),
        ('{"format": 1, "values": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001, "nested too deep"),
        (state_text(saved_at=10**400), "too large"),
        (state_text(version=2**80, version_ceiling=2**80), "version is"),
        (state_text(version_ceiling=MAX_INT), "version_ceiling is"),
        (state_text(revision=MAX_INT + 1), "revision is"),
    ],
    ids=["deep-list", "deep-values", "saved-at-huge", "version-huge", "ceiling-max", "rev-huge"],
)
def test_a_state_file_the_daemon_cannot_go_on_from_is_set_aside(
    tmp_path: Path, text: str, reason: str
) -> None:
    """``load`` never raises: before, a deep nesting (RecursionError) or a ``saved_at``
    beyond a float (OverflowError) escaped it and stopped the daemon at its start, and a
    count above 2^63 - 1 was taken, to be served to clients that cannot acknowledge it."""
    path = tmp_path / "x.state.json"
    path.write_text(text)
    store = StateStore(tmp_path, "x")
    assert store.load() is None
    assert store.set_aside is not None and reason in store.set_aside.reason, store.set_aside
    assert store.set_aside.moved_to is not None
    assert store.set_aside.moved_to.read_text() == text


def test_a_daemon_on_a_deeply_nested_state_file_comes_up(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, configs=[config(tmp_path / "c.yaml", 0.1)])
    daemon.state_dir.mkdir(parents=True)
    (daemon.state_dir / "t.state.json").write_text("[" * 100_000)
    with daemon, RawClient(daemon.socket_path) as client:
        assert client.snapshot["version"] == 1
        (event,) = daemon.events("state_file_unreadable")
        assert "nested too deep" in event["reason"]
    assert "Traceback" not in daemon.log()


def test_a_version_beyond_the_protocol_is_not_served(tmp_path: Path) -> None:
    """A client must be able to acknowledge what it is sent: the protocol's counts are at
    most 2^63 - 1."""
    daemon = DaemonProcess(tmp_path, configs=[config(tmp_path / "c.yaml", 0.1)])
    daemon.state_dir.mkdir(parents=True)
    (daemon.state_dir / "t.state.json").write_text(state_text(version=2**80, version_ceiling=2**80))
    with daemon, RawClient(daemon.socket_path) as client:
        version = client.snapshot["version"]
        assert 0 < version <= MAX_INT, version
        client.send({"type": "applied", "version": version, "step": 0})
        assert client.no_message(0.3)  # no protocol error for its own ack
        (event,) = daemon.events("state_file_unreadable")
        assert "version is" in event["reason"]


# --- things in place of the state dir and its files ------------------------------------------


@pytest.mark.parametrize("where", ["state file", "state lock", "socket lock"])
def test_a_fifo_in_place_of_a_file_does_not_hold_the_start(tmp_path: Path, where: str) -> None:
    """Opening a FIFO to read blocks until a writer comes: the daemon hung at its start,
    SIGTERM too, before its socket was made."""
    daemon = DaemonProcess(tmp_path, configs=[config(tmp_path / "c.yaml", 0.1)])
    daemon.state_dir.mkdir(parents=True)
    daemon.socket_path.parent.mkdir(parents=True, mode=0o700)
    fifo = {
        "state file": daemon.state_dir / "t.state.json",
        "state lock": daemon.state_dir / "t.state.lock",
        "socket lock": daemon.socket_path.with_name("t.sock.lock"),
    }[where]
    os.mkfifo(fifo)
    try:
        daemon.start(timeout=6)
        with RawClient(daemon.socket_path) as client:
            assert client.snapshot["version"] == 1
        if where == "state file":
            (event,) = daemon.events("state_file_unreadable")
            assert "not a regular file" in event["reason"]
            assert Path(event["moved_to"]).is_fifo()  # set aside, not removed
    finally:
        daemon.stop(timeout=3)
    assert daemon.proc is not None and daemon.proc.returncode == 0


def test_a_file_in_place_of_the_state_dir_is_said_as_not_a_folder(tmp_path: Path) -> None:
    """Not "File exists" about a state or lock file that does not exist."""
    cfg = config(tmp_path / "c.yaml", 0.1)
    daemon = DaemonProcess(tmp_path, configs=[cfg])
    daemon.state_dir.write_text("not a folder")
    with daemon, RawClient(daemon.socket_path) as client:
        config(cfg, 0.2)
        assert client.next_update()["values"]["train"]["lr"] == 0.2  # still served
        (lock,) = daemon.events("state_lock_unavailable")
        assert lock["error"] == f"{daemon.state_dir / 't.state.lock'}: Not a directory"
        failed = daemon.events("state_write_failed")
        assert failed and all("Not a directory" in e["error"] for e in failed), failed
        assert all(str(daemon.state_dir) in e["error"] for e in failed), failed


# --- crashes while changes stream in ---------------------------------------------------------


def test_sigkill_while_etcd_changes_stream_loses_nothing_and_versions_go_on(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
    daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint)
    stop, last = threading.Event(), [0]

    def stream() -> None:
        while not stop.is_set():
            last[0] += 1
            store.put(P + "train/warmup_steps", str(last[0]))

    seen = 0
    try:
        for _ in range(2):
            daemon.start()
            with RawClient(daemon.socket_path) as client:
                assert client.snapshot["version"] > seen
                seen = client.snapshot["version"]
                writer = threading.Thread(target=stream)
                stop.clear()
                writer.start()
                try:
                    while seen < client.snapshot["version"] + 300:
                        seen = max(seen, client.next_update()["version"])
                    daemon.signal(signal.SIGKILL)
                    daemon.proc.wait(timeout=10)  # type: ignore[union-attr]
                finally:
                    stop.set()
                    writer.join()
            state = json.loads((daemon.state_dir / "t.state.json").read_text())
            assert state["clean"] is False and state["version_ceiling"] >= state["version"]
        daemon.start()
        with RawClient(daemon.socket_path) as client:
            assert client.snapshot["version"] > seen
            assert client.snapshot["values"]["train"]["warmup_steps"] == last[0]
    finally:
        daemon.stop()
        store.close()
