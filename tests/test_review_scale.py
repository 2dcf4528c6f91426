"""A fleet as its operator sees it, scaled down: one real etcd, several ``hotknob run``
daemons, each with its node name, and light client processes on each; then ``status``
and ``set --wait`` while clients and daemons die and come back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.wait_applied import Applied
from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import wait_for

pytestmark = pytest.mark.timeout(60)

APP = "fleet"
STATUS = f"/hotknob/{APP}/status/"
TTL = 2

# A training loop as light as one gets: apply and report, no torch.
CLIENT = """
import sys, time
from hotknob.model_runtime import LiveConfig
live = LiveConfig.connect(sys.argv[1], client=sys.argv[2], timeout=20)
step = 0
while True:
    step += 1
    live.apply(step)
    live.report(step, loss=1.0)
    time.sleep(0.05)
"""


@pytest.fixture
def store(etcd: EtcdServer) -> Iterator[EtcdStore]:
    s = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
    try:
        yield s
    finally:
        s.close()


def entries(store: EtcdStore) -> dict[str, dict[str, Any]]:
    """The status entries in etcd, by ``<node>/<client>``."""
    kvs, _ = store.read_prefix(STATUS)
    return {key[len(STATUS) :]: json.loads(raw) for key, raw in kvs.items()}


def connect(etcd: EtcdServer) -> list[str]:
    return ["--app", APP, "--etcd-endpoints", etcd.endpoint]


def cli(etcd: EtcdServer, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    done = run_cli(*args, *connect(etcd), timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr[-800:]
    return done


def daemon(etcd: EtcdServer, workdir: Path, node: str) -> DaemonProcess:
    extra = ["--node", node, "--status-every", "1", "--status-ttl", str(TTL)]
    return DaemonProcess(workdir / node, app=APP, endpoints=etcd.endpoint, extra=extra)


def test_a_fleet_seen_through_dead_and_restarted_daemons(
    etcd: EtcdServer, store: EtcdStore, tmp_path: Path
) -> None:
    daemons = [daemon(etcd, tmp_path, f"n{i}") for i in range(3)]
    clients: dict[str, subprocess.Popen[bytes]] = {}
    env = {**os.environ, "HOTKNOB_REPORT_EVERY_S": "0.2"}
    try:
        for d in daemons:
            d.start()
        for i, d in enumerate(daemons):
            for c in range(4):
                clients[f"n{i}/rank{4 * i + c}"] = subprocess.Popen(
                    [sys.executable, "-c", CLIENT, str(d.socket_path), f"rank{4 * i + c}"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
        everyone = set(clients)
        wait_for("every process's entry", lambda: set(entries(store)) == everyone)

        summary = cli(etcd, "status", "--summary")
        assert summary.returncode == 0, summary.stderr
        assert summary.stdout.startswith("12 processes on 3 nodes"), summary.stdout
        table = cli(etcd, "status").stdout.splitlines()
        assert len(table) == 13 and {row.split()[0] for row in table[1:]} == everyone, table

        done = cli(etcd, "set", "train.lr=0.2", "--wait", "15")
        assert done.returncode == 0 and "applied by all 12 processes" in done.stdout, done

        # A daemon killed outright: its processes live on, its entries go with its lease.
        daemons[1].kill()
        killed = time.monotonic()
        wait_for("n1's entries gone", lambda: not any(n.startswith("n1/") for n in entries(store)))
        assert time.monotonic() - killed < TTL + 2
        done = cli(etcd, "set", "train.lr=0.3", "--wait", "15")
        assert done.returncode == 0 and "applied by all 8 processes" in done.stdout, done

        # Back: its processes reconnect and run what etcd holds now.
        written = int(done.stdout.split("wrote at revision ")[1].split()[0])
        daemons[1].start()
        wait_for(
            "n1's processes back, at the newest change",
            lambda: (
                set(entries(store)) == everyone
                and all(e.get("revision", 0) >= written for e in entries(store).values())
            ),
        )

        # A process killed: its daemon drops its entry at once, not at a lease's end.
        victim = "n0/rank0"
        clients[victim].send_signal(signal.SIGKILL)
        clients[victim].wait(timeout=10)
        wait_for("the killed process's entry gone", lambda: victim not in entries(store), 3)
        status = json.loads(cli(etcd, "status", "--json").stdout)
        assert {p["key"] for p in status["processes"]} == everyone - {victim}
        done = cli(etcd, "set", "train.lr=0.4", "--wait", "15")
        assert done.returncode == 0 and "applied by all 11 processes" in done.stdout, done
    finally:
        for proc in clients.values():
            proc.kill()
            proc.wait(timeout=10)
        for d in daemons:
            d.stop()


def test_a_failed_wait_names_who_left_meanwhile(
    etcd: EtcdServer, store: EtcdStore, tmp_path: Path
) -> None:
    # It counted only those still there ("1 of 1 processes"): a process that died during
    # the wait, or whose daemon did, went unnamed, though --json listed it in ``left``.
    with daemon(etcd, tmp_path, "n0") as d:
        hung, leaver = RawClient(d.socket_path, "hung"), RawClient(d.socket_path, "leaver")
        with hung, leaver:
            for c in (hung, leaver):
                c.send({"type": "applied", "version": c.snapshot["version"], "step": 0})
            wait_for(
                "both entries",
                lambda: (
                    all(e.get("version") is not None for e in entries(store).values())
                    and len(entries(store)) == 2
                ),
            )
            wait = subprocess.Popen(
                hotknob_cmd("set", "train.lr=0.2", "--wait", "4", *connect(etcd)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                hung.next_update()
                leaver.next_update()
                # Shown once held a second: the wait read the entries long before.
                wait_for("the change held", lambda: "pending" in entries(store).get("n0/hung", {}))
                leaver.close()
                out, err = wait.communicate(timeout=20)
            finally:
                wait.kill()
                wait.wait()
    assert wait.returncode == 1, (out, err)
    assert "not applied within 4 s by 1 of 1 processes: n0/hung" in err, err
    assert "n0/leaver left meanwhile" in err, err


def test_the_failure_line_counts_those_left_apart() -> None:
    applied = Applied(7, applied={"a/p1": 3}, behind={"b/p2": 5}, left=["c/p3", "c/p4"])
    text = applied.failure(10, now=0.0)
    assert text == (
        "revision 7 is written, but not applied within 10 s by 1 of 2 processes: "
        "b/p2 (at revision 5); c/p3, c/p4 left meanwhile"
    )


# --- status --summary after a daemon started again -----------------------------------------


def test_a_summary_does_not_name_as_behind_processes_that_run_the_same_configuration(
    etcd: EtcdServer,
) -> None:
    """A daemon started again reads the config at etcd's revision of then (status entries
    move it on with no config change), and its processes say that revision; the others
    still say the revision of the last change. The summary named all of those as behind."""
    from hotknob.config.keys import config_prefix, status_prefix

    app = "summ"
    config, status = config_prefix(app), status_prefix(app)

    def entry(name: str, revision: int) -> None:
        body = {"node": name.split("/")[0], "client": name.split("/")[1], "revision": revision}
        etcd.etcdctl("put", status + name, json.dumps(body))

    def revision_now() -> int:
        out = etcd.etcdctl("get", config, "--prefix", "-w", "json").stdout
        return int(json.loads(out)["header"]["revision"])

    etcd.etcdctl("put", config + "train/lr", "0.1")
    old = revision_now()  # processes at a state before the last change: behind
    etcd.etcdctl("put", config + "train/lr", "0.2")
    last = revision_now()  # the last change of the config
    entry("a/p0", old)
    entry("b/p1", last)
    entry("b/p2", last)
    restarted = revision_now()  # a daemon started again now: no config change since
    entry("c/p3", restarted)
    done = run_cli("status", "--app", app, "--etcd-endpoints", etcd.endpoint, "--summary")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    same = next(line for line in lines if line.startswith(f"revision {last}:"))
    assert "b/p1" not in same and "b/p2" not in same, same
    assert f"the configuration of revision {restarted}" in same
    behind = next(line for line in lines if line.startswith(f"revision {old}:"))
    assert "a/p0" in behind, behind  # a change came since: behind, and named
