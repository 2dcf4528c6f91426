"""A guarded key written while the daemon could not watch: it reads etcd in full when it
comes back (the history it missed was compacted), and the guard stands down then, as
``superseded``, not at its verdict. Real etcd, a real daemon, a raw client."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer
from tests.test_guards import P, guard_records, guarded_set, head_revision, kv, wait_for
from tests.test_guards_judging import ack

pytestmark = pytest.mark.timeout(60)


def _stopped(daemon: DaemonProcess) -> None:
    """SIGSTOP, and back once it has stopped: a daemon still running as etcd restarts
    would see its watch break and come back before the write, not past a compaction."""
    assert daemon.proc is not None
    daemon.signal(signal.SIGSTOP)
    stat = Path(f"/proc/{daemon.proc.pid}/stat")
    wait_for("the daemon to stop", lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T")


def test_a_guarded_key_written_while_the_daemon_was_stopped_ends_the_guard_after_its_full_read(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The daemon is stopped inside the window; etcd restarts (its watch breaks), the
    guarded key is written again and etcd compacted past it. Let go, the daemon reads etcd
    in full and takes the new value, but nothing asked the guard: it stood armed, judging
    a value no longer in etcd, for the whole window."""
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        ack(client, client.snapshot["version"], 0)
        out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "1000")
        ack(client, client.next_update()["version"], 1)
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        resyncs = len(daemon.events("etcd_resync"))
        _stopped(daemon)
        try:
            etcd.kill()
            etcd.restart()
            etcd.etcdctl("put", P + "train/lr", "0.25")
            written = kv(etcd, P + "train/lr")[1]
            etcd.etcdctl("compact", str(head_revision(etcd)))
        finally:
            daemon.signal(signal.SIGCONT)

        update = client.next_update(timeout=20)
        assert update["changed"] == {"train.lr": 0.25}, update
        ack(client, update["version"], 2)
        resynced = [e for e in daemon.events("etcd_resync")[resyncs:] if e["prefix"] == P]
        assert resynced, daemon.log()  # the value came in a full read, not as a change
        # No report came since the change: only the full read can have ended it.
        (event,) = wait_for(
            "the guard to stand down", lambda: daemon.events("guard_superseded"), timeout=10
        )
        assert event["guard"] == out["guard"], event
        (record,) = guard_records(etcd)
        assert record["state"] == "superseded" and record["id"] == out["guard"], record
        assert f"(train.lr at revision {written})" in record["outcome"]["reason"], record
        assert record["outcome"]["changed"] == {P + "train/lr": written}, record
        # Nothing reverted: the later write stays.
        assert kv(etcd, P + "train/lr") == ("0.25", written)
        assert not daemon.events("change_reverted")
        assert len(daemon.events("guard_superseded")) == 1
        assert daemon.proc is not None and daemon.proc.poll() is None
        errors = [line for line in daemon.log().splitlines() if '"level": "error"' in line]
        assert errors == []
