"""No file descriptor, thread or memory growth in the daemon over connects and changes.

A real ``hotknob run`` on a real etcd is warmed up, measured from ``/proc/PID``
(open fds, ``Threads``, ``VmRSS``), put through 1,000 client connects and
disconnects and 10,000 accepted etcd changes while a live client follows, and
measured again once it is idle. The figures go to ``build/figures/resources.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.model_runtime import LiveConfig
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer
from tests.figures import record
from tests.live_trainer import Trainer, wait_for

APP = "res"
KEY = f"/hotknob/{APP}/config/train/warmup_steps"
CONNECTS = 1000
CHANGES = 10_000
# Allowances: an fd or thread may be mid-close when sampled; RSS moves with the allocator.
FD_SLACK = 2
THREAD_SLACK = 1
RSS_SLACK_KIB = 8 * 1024


@dataclass(frozen=True)
class Usage:
    fds: int
    threads: int
    rss_kib: int


def usage(pid: int) -> Usage:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return Usage(fds, int(fields["Threads"][0]), int(fields["VmRSS"][0]))


def settled(pid: int, wait: float = 1.0) -> Usage:
    """Usage after the daemon has been idle for ``wait`` seconds (closes and frees finished)."""
    time.sleep(wait)
    return usage(pid)


def connect_and_leave(path: Path, i: int) -> None:
    if i % 10 == 0:  # a full runtime client: hello, snapshot, applied (a status entry), close
        with LiveConfig.connect(socket=path, timeout=10, client=f"short-{i}"):
            pass
    else:
        with RawClient(path, name=f"raw-{i}") as client:
            assert client.snapshot["type"] == "snapshot"


def push_changes(store: EtcdStore, start: int, count: int) -> int:
    last = start
    for last in range(start, start + count):
        store.put(KEY, str(last))
    return last


def follow(live: LiveConfig, last: int) -> None:
    wait_for(f"the client to apply change {last}", lambda: live["train.warmup_steps"] == last, 60)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_no_fd_thread_or_memory_growth(tmp_path: Path) -> None:
    started = time.monotonic()
    with EtcdServer("resources") as etcd:
        daemon = DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=["--node", "n"])
        store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
        with daemon:
            assert daemon.proc is not None
            pid = daemon.proc.pid
            live = LiveConfig.connect(socket=daemon.socket_path, timeout=10, client="follower")
            trainer = Trainer(live).start()
            try:
                for i in range(50):  # warm-up: first-use allocations are not growth
                    connect_and_leave(daemon.socket_path, i)
                last = push_changes(store, 1, 500)
                follow(live, last)
                before = settled(pid)

                for i in range(CONNECTS):
                    connect_and_leave(daemon.socket_path, i)
                after_connects = settled(pid)

                halves = []  # two halves: growth that is a leak keeps going, a plateau does not
                for _ in range(2):
                    last = push_changes(store, last + 1, CHANGES // 2)
                    follow(live, last)
                    halves.append(settled(pid))
                after_half, after_changes = halves
                assert not trainer.invalid and not trainer.errors
                versions = trainer.versions()
                assert versions == sorted(set(versions))
            finally:
                trainer.stop()
                live.close()
                store.close()
            accepted = len(daemon.events("change_accepted"))
    for name, now in (("connects", after_connects), ("changes", after_changes)):
        assert now.fds <= before.fds + FD_SLACK, (name, before, now)
        assert now.threads <= before.threads + THREAD_SLACK, (name, before, now)
        assert now.rss_kib <= before.rss_kib + RSS_SLACK_KIB, (name, before, now)
    assert after_changes.rss_kib <= after_half.rss_kib + RSS_SLACK_KIB // 4, (
        after_half,
        after_changes,
    )
    assert accepted >= CHANGES
    record(
        "resources",
        command="pytest tests/test_resources.py",
        connects=CONNECTS,
        changes=CHANGES,
        changes_accepted_by_daemon=accepted,
        before=asdict(before),
        after_connects=asdict(after_connects),
        after_half_of_the_changes=asdict(after_half),
        after_changes=asdict(after_changes),
        seconds=round(time.monotonic() - started, 1),
    )
