"""What an operator sees of ``set``, ``unset``, ``rollback``, ``watch`` and ``history``
in the odd cases: nothing to change, no process to wait for, a revert racing a
rejection, a guard's revert of a key to null against one that deletes it, a rollback
to a revision etcd no longer (or not yet) holds, a commit whose answer is lost.

Real etcd, real daemons, clients speaking the protocol, and the CLI as a user runs it.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.wait_applied import WatchedEntries
from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import Watch, metrics, wait_for
from tests.test_rollout import Acking

pytestmark = pytest.mark.timeout(120)

APP = "t"  # as tests.test_guards's Watch reads it
P = f"/hotknob/{APP}/config/"


def hk(etcd: EtcdServer, *args: str, endpoint: str | None = None) -> Any:
    return run_cli(*args, "--app", APP, "--etcd-endpoints", endpoint or etcd.endpoint)


def head(etcd: EtcdServer) -> int:
    out = etcd.etcdctl("get", "/", "--prefix", "--keys-only", "-w", "json").stdout
    return int(json.loads(out)["header"]["revision"])


def one_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    return line


@pytest.fixture
def acking(etcd: EtcdServer, tmp_path: Path) -> Iterator[tuple[DaemonProcess, Acking]]:
    """A daemon (node n1) and one process on it that applies every change it gets."""
    with (
        DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"]) as d,
        Acking(d, "p1") as process,
    ):
        wait_for("its status entry", lambda: "n1/p1" in entries(etcd))
        yield d, process


# --- nothing to change: the documented --json shape, one line of text ------------------------


def test_nothing_to_change_gives_the_shape_of_a_write(
    etcd: EtcdServer, acking: tuple[DaemonProcess, Acking]
) -> None:
    done = hk(etcd, "set", "train.lr=0.01", "--wait", "20")
    assert done.returncode == 0, done.stderr
    at = head(etcd)
    for args in (
        ("set", "train.lr=0.01"),
        ("unset", "train.momentum"),  # not in etcd
        ("rollback", "--to-revision", str(at)),
    ):
        done = hk(etcd, *args, "--json")
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["changed"] == {} and out["deleted"] == [] and out["revision"] >= at, out
        # With --wait: every process runs the newest value etcd holds, and --json says so.
        done = hk(etcd, *args, "--json", "--wait", "20")
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["changed"] == {} and out["deleted"] == [], out
        assert out["wait"]["applied"] == ["n1/p1"] and out["wait"]["behind"] == [], out
    done = hk(etcd, "rollback", "--to-revision", str(at), "--dry-run", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == {}, done.stdout
    # In text: one line, not "nothing to do" then "(no change)".
    done = hk(etcd, "set", "train.lr=0.01")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith("nothing to do: etcd holds those values already (at revision "), line
    done = hk(etcd, "rollback", "--to-revision", str(at))
    assert done.stdout.strip() == (
        f"nothing to do: the config already equals its state at revision {at}"
    ), done.stdout


# --- set --wait with no process: exit 1, not "applied everywhere" ----------------------------


def test_set_wait_with_no_process_connected_exits_1(etcd: EtcdServer) -> None:
    started = time.monotonic()
    done = hk(etcd, "set", "train.lr=0.02", "--wait", "1.5", "--json")
    line = one_line(done, 1)
    assert time.monotonic() - started >= 1.5  # a process may connect meanwhile
    assert line.startswith("hotknob: revision "), line
    assert "is written, but no process is connected to a daemon of the app" in line, line
    out = json.loads(done.stdout)
    assert out["changed"] == {"train.lr": 0.02} and out["wait"]["applied"] == [], out
    # Nothing to change, with no process: the same.
    done = hk(etcd, "set", "train.lr=0.02", "--wait", "1")
    assert "no process is connected to a daemon of the app" in one_line(done, 1)


def test_set_wait_waits_for_a_process_that_connects_meanwhile(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"]) as d:
        done = subprocess.Popen(
            hotknob_cmd("set", "train.lr=0.03", "--wait", "30", "--app", APP,
                        "--etcd-endpoints", etcd.endpoint),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        time.sleep(1.5)  # the daemon restarting, say: no process yet
        with Acking(d, "p1"):
            out, err = done.communicate(timeout=60)
    assert done.returncode == 0, (out, err)
    assert "applied by the only process within" in out


# --- a rejection that a revert clears is still a rejection -----------------------------------


def test_a_rejection_cleared_by_a_revert_is_still_reported(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """n2 refuses the change; the value is taken back (as a guard's revert does) before
    the process on n1 applies anything: n2 then runs the revert's revision, with no
    refusal in its entry, but it never ran the change."""
    with (
        DaemonProcess(tmp_path / "n1", app=APP, endpoints=etcd.endpoint,
                      extra=["--node", "n1"]) as d1,
        DaemonProcess(tmp_path / "n2", app=APP, endpoints=etcd.endpoint,
                      extra=["--node", "n2", "--schema", "tests.test_rollout:Strict"]) as d2,
        Acking(d1, "p1") as p1,
        Acking(d2, "p2"),
    ):  # fmt: skip
        wait_for("both entries", lambda: len(entries(etcd)) == 2)
        p1.paused.set()
        done = subprocess.Popen(
            hotknob_cmd("set", "sampling.temperature=1.5", "--wait", "30", "--app", APP,
                        "--etcd-endpoints", etcd.endpoint),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        wait_for("n2's refusal", lambda: "rejected" in entries(etcd).get("n2/p2", {}))
        time.sleep(0.5)  # the wait has seen it
        p1.paused.clear()
        etcd.etcdctl("del", P + "sampling/temperature")
        wait_for("n2's refusal cleared", lambda: "rejected" not in entries(etcd)["n2/p2"])
        out, err = done.communicate(timeout=60)
    assert done.returncode == 1, (out, err)
    assert "rejected by the daemon of 1 of 2 processes (n2/p2): sampling.temperature" in err, err
    assert "applied by all" not in out, out


def test_the_wait_sees_a_refusal_that_the_next_entry_clears(etcd: EtcdServer) -> None:
    """Both entries came before the wait looked: it is given the one with the refusal
    first, not only the newest."""
    key = f"/hotknob/{APP}/status/n2/p2"
    refused = {"revision": 5, "reason": "too hot", "keys": ["sampling.temperature"]}
    store = EtcdStore(EtcdOptions.from_strings(etcd.endpoint))
    try:
        watched = WatchedEntries(store, APP)
        etcd.etcdctl("put", key, json.dumps({"revision": 4, "rejected": refused}))
        etcd.etcdctl("put", key, json.dumps({"revision": 6}))
        time.sleep(0.5)  # both are queued
        assert watched(5)["n2/p2"] == {"revision": 4, "rejected": refused}
        assert watched(5)["n2/p2"] == {"revision": 6}
    finally:
        store.close()


def entries(etcd: EtcdServer) -> dict[str, dict[str, Any]]:
    prefix = f"/hotknob/{APP}/status/"
    out = etcd.etcdctl("get", prefix, "--prefix", "-w", "json").stdout
    found = {}
    for kv in json.loads(out).get("kvs", []):
        key = base64.b64decode(kv["key"]).decode()[len(prefix) :]
        found[key] = json.loads(base64.b64decode(kv["value"]))
    return found


# --- watch: a revert to null against a revert that deletes -----------------------------------


def test_watch_tells_a_revert_to_null_from_one_that_deletes(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with (
        DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"]) as d,
        RawClient(d.socket_path, "c1") as client,
    ):
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        watch = Watch(d)
        try:
            watch.until("watching")
            step = 0

            def apply() -> None:
                nonlocal step
                step += 10
                update = client.next_update()
                client.send({"type": "applied", "version": update["version"], "step": step})

            def guarded() -> tuple[dict[str, Any], str]:
                guard = ["--guard", "loss < 0.00001", "--window", "40", "--patience", "1"]
                armed = len(d.events("guard_armed")) + 1
                done = hk(etcd, "set", "train.grad_clip=5.0", *guard, "--json")
                assert done.returncode == 0, done.stderr
                apply()
                wait_for("the guard armed", lambda: len(d.events("guard_armed")) == armed)
                client.send(metrics(step + 1, loss=1.0))
                line = watch.until("REVERTED")[-1]
                apply()  # the revert
                return json.loads(done.stdout), line

            # null is the default too: neither of these changes a value in force.
            assert hk(etcd, "set", "train.grad_clip=null").returncode == 0
            first, to_null = guarded()
            assert hk(etcd, "unset", "train.grad_clip").returncode == 0
            second, deleted = guarded()
        finally:
            watch.close()
        wait_for("both reverts logged", lambda: len(d.events("change_reverted")) == 2)
        events = d.events("change_reverted")
    for event, written, line in zip(events, (first, second), (to_null, deleted), strict=True):
        assert event["guard"] == written["guard"], (event, written)
        assert event["guarded_revision"] == written["revision"], (event, written)
        where = f"(the change at rev {written['revision']})"
        assert f"REVERTED rev {event['revision']} by guard {written['guard']} {where}: " in line
    assert events[0]["restored"] == events[1]["restored"] == {"train.grad_clip": None}
    assert events[0]["deleted"] == [] and events[1]["deleted"] == ["train.grad_clip"]
    assert "train.grad_clip=null (was 5.0): " in to_null, to_null
    assert "train.grad_clip=(deleted) (was 5.0): " in deleted, deleted
    # One failed report: said as one, not "1 reports in a row (steps 31..31)".
    assert "'loss < 0.00001' failed on the report from n1/c1 at step " in deleted, deleted


# --- rollback to a revision etcd does not hold ------------------------------------------------


def test_rollback_to_a_compacted_a_future_or_an_impossible_revision(etcd: EtcdServer) -> None:
    for value in ("0.1", "0.2", "0.3"):
        assert hk(etcd, "set", f"train.lr={value}").returncode == 0
    old = head(etcd) - 1
    now = head(etcd)
    etcd.etcdctl("compact", str(now))
    line = one_line(hk(etcd, "rollback", "--to-revision", str(old)), 1)
    assert line == (
        f"hotknob: cannot roll back to revision {old}: etcd compacted it away, and keeps no "
        "state that old (`hotknob history` lists the revisions it keeps)"
    ), line
    line = one_line(hk(etcd, "rollback", "--to-revision", str(now + 100)), 1)
    assert line == (
        f"hotknob: cannot roll back to revision {now + 100}: etcd is only at revision {now}"
    ), line


def test_rollback_to_a_revision_past_int64_is_a_usage_error(etcd: EtcdServer) -> None:
    # Not "cannot reach etcd" (exit 3): no revision can be that large.
    line = one_line(hk(etcd, "rollback", "--to-revision", "99999999999999999999"), 2)
    assert "--to-revision must be a revision (1 or more), got 99999999999999999999" in line


# --- a commit whose answer is lost ------------------------------------------------------------


class MuteProxy:
    """A TCP proxy to etcd that stops relaying etcd's answers on a connection once the
    client sent it a commit (the who-and-when record only a commit carries)."""

    TRIGGER = b'"by": "'

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)  # so that the accepting thread sees ``closed``
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.closed = False
        self._accept = threading.Thread(target=self._accepting, name="test-proxy")
        self._accept.start()

    def _accepting(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            upstream = socket.create_connection(self.target)
            thread = threading.Thread(target=self._pump, args=(conn, upstream), name="test-pump")
            self.threads.append(thread)
            thread.start()

    def _pump(self, conn: socket.socket, upstream: socket.socket) -> None:
        mute = False
        try:
            while not self.closed:
                ready, _, _ = select.select([conn, upstream], [], [], 0.2)
                for side in ready:
                    data = side.recv(65536)
                    if not data:
                        return
                    if side is conn:
                        mute |= self.TRIGGER in data
                        upstream.sendall(data)
                    elif not mute:
                        conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()
            upstream.close()

    def close(self) -> None:
        self.closed = True
        self._accept.join(5)
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


def test_a_commit_whose_answer_is_lost_says_it_may_be_written(etcd: EtcdServer) -> None:
    proxy = MuteProxy(etcd.client_port)
    try:
        endpoints = ("--etcd-endpoints", f"127.0.0.1:{proxy.port}", "--etcd-timeout", "2")
        done = run_cli("set", "train.lr=0.2", "--app", APP, *endpoints, timeout=60)
    finally:
        proxy.close()
    line = one_line(done, 3)
    assert "(commit 2 keys): no answer within 2s" in line, line
    assert line.endswith(
        "; the change may have been written: `hotknob history train.lr` shows whether it was"
    ), line
    assert etcd.etcdctl("get", P + "train/lr", "--print-value-only").stdout.strip() == "0.2"


def test_history_limit_has_help() -> None:
    done = run_cli("history", "--help")
    assert "--limit N" in done.stdout and "the newest N changes" in done.stdout, done.stdout
