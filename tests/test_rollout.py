"""Did a change land everywhere: ``set --wait``, and what ``status`` says of a daemon that
refused one (an etcd revision, its config files), from the daemons' status entries.

Real etcd, real daemons, real files and clients speaking the protocol; ``wait_applied``
itself is also checked on entries given by hand (it reads them through a function).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from hotknob.config.schema import SamplingSchema, TrainParams
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.status_entries import status_entries
from hotknob.daemon.wait_applied import Entries, WatchedEntries, wait_applied
from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import etcd_ranges

pytestmark = pytest.mark.timeout(120)

APP = "wait"


class StrictSampling(SamplingSchema):
    temperature: float = Field(1.0, ge=0, le=1.2)


class Strict(BaseModel):
    """A stricter schema on one node (a rolling upgrade, say): ``temperature <= 1.2``."""

    train: TrainParams = Field(default_factory=TrainParams)
    sampling: StrictSampling = Field(default_factory=StrictSampling)


def hk(etcd: EtcdServer, *args: str) -> Any:
    return run_cli(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint)


class Acking:
    """A client that acknowledges each update it gets (as ``LiveConfig.apply`` would),
    until ``paused``."""

    def __init__(self, daemon: DaemonProcess, name: str):
        self.client = RawClient(daemon.socket_path, name)
        self.paused = threading.Event()
        self._stop = threading.Event()
        self.step = 0
        self._ack(self.client.snapshot)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    errors: list[dict[str, str]] | None = None  # what its acks of updates say raised

    def _ack(self, message: dict[str, Any]) -> None:
        self.step += 1
        ack = {"type": "applied", "version": message["version"], "step": self.step}
        if self.errors and message["type"] == "update":
            ack["errors"] = self.errors
        self.client.send(ack)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.client.next(timeout=0.2)
            except TimeoutError:
                continue
            except (EOFError, OSError):
                return
            if message["type"] == "update" and not self.paused.is_set():
                self._ack(message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()

    def __enter__(self) -> Acking:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def two_nodes(etcd: EtcdServer, tmp_path: Path) -> Iterator[tuple[Acking, Acking]]:
    """n1 with the built-in schema, n2 with ``Strict``; one acking client on each."""
    with (
        DaemonProcess(
            tmp_path / "n1", app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"]
        ) as d1,
        DaemonProcess(
            tmp_path / "n2",
            app=APP,
            endpoints=etcd.endpoint,
            extra=["--node", "n2", "--schema", "tests.test_rollout:Strict"],
        ) as d2,
    ):
        clients = Acking(d1, "p1"), Acking(d2, "p2")
        try:
            deadline = time.monotonic() + 20
            while len(_entries(etcd)) < 2:
                assert time.monotonic() < deadline, _entries(etcd)
                time.sleep(0.1)
            yield clients
        finally:
            for client in clients:
                client.close()


def _entries(etcd: EtcdServer) -> dict[str, dict[str, Any]]:
    done = etcd.etcdctl("get", f"/hotknob/{APP}/status/", "--prefix", "-w", "json")
    prefix = f"/hotknob/{APP}/status/"
    entries = {}
    for kv in json.loads(done.stdout).get("kvs", []):
        name = base64.b64decode(kv["key"]).decode()[len(prefix) :]
        entries[name] = json.loads(base64.b64decode(kv["value"]))
    return entries


def test_set_wait_returns_once_every_process_applied(
    etcd: EtcdServer, two_nodes: tuple[Acking, Acking]
) -> None:
    done = hk(etcd, "set", "sampling.temperature=1.1", "--wait", "30")
    assert done.returncode == 0, done.stderr
    assert "applied by all 2 processes within" in done.stdout
    written = int(done.stdout.split("wrote at revision ")[1].split()[0])
    entries = _entries(etcd)
    assert all(e["revision"] >= written for e in entries.values()), entries


def test_set_wait_fails_on_a_process_whose_apply_raised(
    etcd: EtcdServer, two_nodes: tuple[Acking, Acking]
) -> None:
    """A callback or a binding that refuses the value: the process acks what it runs, with
    the error; the values before may still be in force there. Not "applied"."""
    first, _ = two_nodes
    first.errors = [{"key": "sampling.temperature", "error": "ValueError: too hot for me"}]
    done = hk(etcd, "set", "sampling.temperature=1.1", "--wait", "30", "--json")
    assert done.returncode == 1, done.stderr
    assert (
        "applied with an error by 1 of 2 processes (n1/p1): sampling.temperature: "
        "ValueError: too hot for me"
    ) in done.stderr
    wait = json.loads(done.stdout)["wait"]
    assert wait["applied"] == ["n2/p2"] and list(wait["failed"]) == ["n1/p1"]


def test_set_wait_fails_on_a_daemon_that_rejects_it_and_status_says_why(
    etcd: EtcdServer, two_nodes: tuple[Acking, Acking]
) -> None:
    done = hk(etcd, "set", "sampling.temperature=1.5", "--wait", "60", "--json")
    assert done.returncode == 1, (done.stdout, done.stderr)
    (line,) = done.stderr.strip().splitlines()
    assert "is written, but rejected by the daemon of 1 of 2 processes (n2/p2)" in line
    assert "sampling.temperature (from etcd): Input should be less than or equal to 1.2" in line
    result = json.loads(done.stdout)
    wait = result["wait"]
    assert wait["applied"] == ["n1/p1"] and list(wait["rejected"]) == ["n2/p2"]
    assert wait["behind"] == [] and wait["seconds"] < 60  # it did not wait out the time
    status = hk(etcd, "status")
    assert f"its daemon rejected revision {result['revision']}: sampling.temperature" in (
        status.stdout
    )
    # A change of another key that both take leaves it: 1.5 is still in etcd, and n2
    # runs without it.
    done = hk(etcd, "set", "train.lr=0.05", "--wait", "30")
    assert done.returncode == 0 and "applied by all 2 processes" in done.stdout, done.stderr
    rejected = _entries(etcd)["n2/p2"]["rejected"]
    assert rejected["revision"] == result["revision"], rejected
    assert rejected["keys"] == ["sampling.temperature"], rejected
    assert f"its daemon rejected revision {result['revision']}" in hk(etcd, "status").stdout
    # A change of that key that n2 takes clears it.
    done = hk(etcd, "set", "sampling.temperature=0.5", "--wait", "30")
    assert done.returncode == 0, done.stderr
    assert "rejected" not in _entries(etcd)["n2/p2"]
    assert "rejected" not in hk(etcd, "status").stdout


def test_set_wait_tells_a_refusal_cleared_before_any_entry_said_it(
    etcd: EtcdServer, two_nodes: tuple[Acking, Acking]
) -> None:
    """A tuner writes temperature 1.5 and then 0.5, back to back, within the 0.2 s a
    daemon waits between two writes of its status entries: n2 refuses 1.5, takes 0.5,
    and the entry that said 1.5 was refused was never written. ``set --wait`` of the 1.5
    revision must still say n2 rejected it, not that it applied it (n2/p2 runs a later
    revision), and ``status`` must not show an error: n2 runs what etcd says now."""
    store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
    config = f"/hotknob/{APP}/config/"
    try:
        # An entry just written on each node: the next one waits for the rest of 0.2 s.
        lr = store.put(config + "train/lr", "0.05")
        deadline = time.monotonic() + 20
        while not all(e.get("revision", 0) >= lr for e in _read_entries(store).values()):
            assert time.monotonic() < deadline, _read_entries(store)
            time.sleep(0.005)
        hot = store.put(config + "sampling/temperature", "1.5")
        cool = store.put(config + "sampling/temperature", "0.5")
        assert cool == hot + 1
        result = wait_applied(WatchedEntries(store, APP), hot, 30, keys=["sampling.temperature"])
        assert result.done and list(result.applied) == ["n1/p1"], result
        assert list(result.rejected) == ["n2/p2"], result
        assert "less than or equal to 1.2" in result.rejected["n2/p2"], result
        # 0.5 is applied everywhere: n2's cleared refusal is not of that revision.
        result = wait_applied(WatchedEntries(store, APP), cool, 30, keys=["sampling.temperature"])
        assert result.ok and sorted(result.applied) == ["n1/p1", "n2/p2"], result
    finally:
        store.close()
    entry = _entries(etcd)["n2/p2"]
    run = entry["rejected_before"]["sampling.temperature"]
    assert "rejected" not in entry and run["since"] == run["revision"] == hot, entry
    status = hk(etcd, "status")
    assert status.returncode == 0 and "rejected" not in status.stdout, status.stdout


def _read_entries(store: EtcdStore) -> dict[str, dict[str, Any]]:
    kvs, _ = store.read_prefix(f"/hotknob/{APP}/status/")
    return status_entries(APP, kvs)


def test_a_daemon_restarted_on_a_value_it_refused_runs_what_it_ran(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A node with a stricter schema refused temperature 1.5 and ran 1.1; restarted (a pod
    rescheduled, say) while etcd still holds 1.5, it must go on with 1.1, not the schema's
    default 1.0, and its processes' entries must still say what it refuses."""
    strict = DaemonProcess(
        tmp_path / "n2",
        app=APP,
        endpoints=etcd.endpoint,
        extra=["--node", "n2", "--schema", "tests.test_rollout:Strict"],
    )
    with strict, Acking(strict, "p2"):
        assert hk(etcd, "set", "sampling.temperature=1.1", "--wait", "30").returncode == 0
        refused = hk(etcd, "set", "sampling.temperature=1.5", "--wait", "30")
        assert refused.returncode == 1, (refused.stdout, refused.stderr)
    written = int(refused.stdout.split("wrote at revision ")[1].split()[0])
    with strict, Acking(strict, "p2") as client:
        assert client.client.snapshot["values"]["sampling"]["temperature"] == 1.1
        assert strict.events("etcd_value_kept")[-1]["keys"] == ["sampling.temperature"]
        deadline = time.monotonic() + 20
        while "rejected" not in _entries(etcd).get("n2/p2", {}):
            assert time.monotonic() < deadline, _entries(etcd)
            time.sleep(0.1)
        rejected = _entries(etcd)["n2/p2"]["rejected"]
        assert rejected["keys"] == ["sampling.temperature"], rejected
        assert rejected["revision"] >= written, rejected
        assert "less than or equal to 1.2" in rejected["reason"], rejected


def test_set_wait_names_a_process_that_has_not_applied_it_in_time(
    etcd: EtcdServer, two_nodes: tuple[Acking, Acking]
) -> None:
    first, _ = two_nodes
    before = _entries(etcd)["n1/p1"]["revision"]
    first.paused.set()  # a rank in a long step: it has the update, and no apply comes
    done = hk(etcd, "set", "train.lr=0.02", "--wait", "8")
    assert done.returncode == 1, (done.stdout, done.stderr)
    (line,) = done.stderr.strip().splitlines()
    # Its daemon looks every second: held at two looks in a row, it is ``pending``.
    held = f"not applied within 8 s by 1 of 2 processes: n1/p1 (at revision {before}; sent it,"
    assert held in line and ", nothing applied for " in line, line
    assert "; the change was sent to it, to be taken at the next apply (a long step" in line
    assert "wrote at revision" in done.stdout  # the change stays written
    written = int(done.stdout.split("wrote at revision ")[1].split()[0])
    assert _entries(etcd)["n1/p1"]["pending"]["revision"] == written
    row = next(r for r in hk(etcd, "status").stdout.splitlines() if r.startswith("n1/p1"))
    assert f"{before} ({written} pending " in row, row
    first.paused.clear()
    # unset and rollback take it too; the next change reaches the paused one as well.
    done = hk(etcd, "unset", "train.lr", "--wait", "30")
    assert done.returncode == 0 and "applied by all 2 processes" in done.stdout, done.stderr
    assert "pending" not in _entries(etcd)["n1/p1"]  # its acknowledgement cleared it
    done = hk(etcd, "rollback", "--to-revision", str(written), "--wait", "30", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["changed"] == {"train.lr": 0.02}
    assert result["wait"]["applied"] == ["n1/p1", "n2/p2"] and not result["wait"]["behind"]
    assert all(e["revision"] >= result["revision"] for e in _entries(etcd).values())


def test_set_wait_follows_the_entries_with_a_watch_not_a_read_each_time(
    etcd: EtcdServer, two_nodes: tuple[Acking, Acking]
) -> None:
    """On a hundred nodes a read of every status entry is half a megabyte: the wait reads
    them once, then follows what changes (counted from etcd's own metrics)."""
    first, _ = two_nodes
    before = etcd_ranges(etcd)
    assert hk(etcd, "set", "train.lr=0.02").returncode == 0
    plain = etcd_ranges(etcd) - before
    before = etcd_ranges(etcd)
    time.sleep(3)
    idle = etcd_ranges(etcd) - before  # the daemons' own reads (their watches' checks)
    first.paused.set()  # so that the wait lasts its 3 s
    before = etcd_ranges(etcd)
    done = hk(etcd, "set", "train.lr=0.03", "--wait", "3")
    waited = etcd_ranges(etcd) - before
    assert done.returncode == 1 and "not applied within 3 s" in done.stderr, done.stderr
    # One read of the entries, and some slack for the daemons' own: a read every 0.25 s
    # would be 12 more.
    assert waited - idle <= plain + 3, (plain, idle, waited)


def test_status_says_when_a_daemon_refuses_its_config_files(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A ConfigMap or a file in git edited to an invalid value, or to text that does not
    parse: the daemon keeps the last good state; ``status``, run anywhere, says why."""
    config = tmp_path / "config.yaml"
    good = "train:\n  lr: 0.1\n"
    config.write_text(good)
    extra = ["--node", "n1", "--config", str(config)]
    with (
        DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=extra) as daemon,
        Acking(daemon, "p1") as _,
    ):
        _wait_entry(etcd, "n1/p1", lambda e: "revision" in e)
        _save(config, "train:\n  lr: -1\n")
        entry = _wait_entry(etcd, "n1/p1", lambda e: "config_files" in e)
        assert (
            f"train.lr (from files: {config}): Input should be greater than 0"
            in (entry["config_files"]["rejected"])
        )
        status = hk(etcd, "status").stdout
        assert "its daemon rejected its config files: train.lr (from files: /" in status
        _save(config, "train: [unclosed\n")
        entry = _wait_entry(etcd, "n1/p1", lambda e: "unreadable" in e.get("config_files", {}))
        unreadable = entry["config_files"]["unreadable"]
        assert unreadable.count(str(config)) == 1 and "not valid YAML" in unreadable, unreadable
        assert "rejected" in entry["config_files"]  # the last contents read are still refused
        status = hk(etcd, "status").stdout  # a row: the first error, and how many more
        assert "its daemon rejected its config files: train.lr (from files: /" in status
        assert "(+1 more: status --summary)" in status, status
        status = hk(etcd, "status", "--summary").stdout  # each error whole
        assert f"its daemon cannot read a config file: {config}: not valid YAML" in status
        # Back to the refused contents: readable again, still refused.
        _save(config, "train:\n  lr: -1\n")
        entry = _wait_entry(etcd, "n1/p1", lambda e: "unreadable" not in e["config_files"])
        assert "rejected" in entry["config_files"]
        # Fixed: nothing to say.
        _save(config, good)
        _wait_entry(etcd, "n1/p1", lambda e: "config_files" not in e)
        assert "its daemon" not in hk(etcd, "status").stdout


def _save(path: Path, text: str) -> None:
    """As editors and the kubelet do: write aside, then rename over."""
    aside = path.with_suffix(".tmp")
    aside.write_text(text)
    aside.replace(path)


def _wait_entry(
    etcd: EtcdServer, name: str, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        entry = _entries(etcd).get(name, {})
        if ready(entry):
            return entry
        assert time.monotonic() < deadline, entry
        time.sleep(0.1)


def test_set_wait_that_loses_etcd_says_the_change_is_written(
    etcd: EtcdServer, two_nodes: tuple[Acking, Acking]
) -> None:
    first, _ = two_nodes
    first.paused.set()  # so that the wait goes on until etcd is gone
    done = subprocess.Popen(
        hotknob_cmd("set", "train.lr=0.03", "--wait", "60", "--app", APP),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HOTKNOB_ETCD_ENDPOINTS": etcd.endpoint},
    )
    deadline = time.monotonic() + 30
    while "0.03" not in etcd.etcdctl("get", f"/hotknob/{APP}/config/train/lr").stdout:
        assert time.monotonic() < deadline and done.poll() is None, done.communicate()
        time.sleep(0.1)
    etcd.kill()
    out, err = done.communicate(timeout=60)
    assert done.returncode == 3, (out, err)
    (line,) = err.strip().splitlines()
    assert line.startswith("hotknob: revision "), line
    assert " is written, but the wait for it failed: " in line, line
    assert "cannot reach etcd" in line, line


def test_set_wait_with_no_process_and_a_bad_wait(etcd: EtcdServer) -> None:
    # Written, but nobody runs it: exit 1, not "applied everywhere".
    done = hk(etcd, "set", "train.lr=0.02", "--wait", "1")
    assert done.returncode == 1, done.stderr
    assert "no process is connected to a daemon of the app" in done.stderr
    for bad in ("0", "-1", "nan", "inf", "soon"):
        done = hk(etcd, "set", "train.lr=0.03", "--wait", bad)
        assert done.returncode == 2 and "not a positive number of seconds" in done.stderr
    assert "0.03" not in hk(etcd, "get", "train.lr").stdout
    # With a guard, exit 0 says the guard passed it: with no process, nothing judged it.
    done = hk(etcd, "set", "train.lr=0.04", "--guard", "loss < 3", "--window", "10")
    assert done.returncode == 0, done.stderr  # no process to take a baseline from is fine
    done = hk(etcd, "set", "train.lr=0.05", "--guard", "loss < 3", "--window", "10", "--wait", "2")
    assert done.returncode == 1, done.stderr
    assert "is armed, but no process applied the change, so nothing judged it" in done.stderr
    done = hk(etcd, "set", "train.lr=0.06", "--guard", "loss < 3", "--window", "10", "--wait", "2",
              "--json")  # fmt: skip
    assert done.returncode == 1 and json.loads(done.stdout)["verdict"]["state"] == "armed"


class FakeClock:
    """Entries given in turn, each after ``step`` seconds (at most the wait allowed)."""

    def __init__(self, reads: Callable[[], Entries], step: float = 0.25) -> None:
        self.t = 0.0
        self.reads = reads
        self.step = step

    def now(self) -> float:
        return self.t

    def next_entries(self, wait: float) -> Entries:
        self.t += min(wait, self.step)
        return self.reads()


def test_wait_applied_follows_processes_that_come_and_go() -> None:
    """Entries read in turn: p2 catches up, p3 leaves, p4 appears at the revision."""
    reads = iter(
        [
            {"n/p1": {"revision": 10}, "n/p2": {"revision": 9}, "n/p3": {"revision": 9}},
            {"n/p1": {"revision": 10}, "n/p2": {"revision": 9}},
            {"n/p1": {"revision": 12}, "n/p2": {"revision": 10}, "n/p4": {"revision": 11}},
        ]
    )
    clock = FakeClock(lambda: next(reads))
    result = wait_applied(clock.next_entries, 10, 30, clock=clock.now)
    assert result.ok and sorted(result.applied) == ["n/p1", "n/p2", "n/p4"]
    assert result.left == ["n/p3"] and result.seconds == pytest.approx(0.5)
    assert result.summary() == "applied by all 3 processes within 0.50 s (n/p3 left meanwhile)"


def test_wait_applied_stops_at_its_time_and_tells_rejected_from_behind() -> None:
    entries = {
        "n/p1": {"revision": 7, "step": 3},
        "n/p2": {"revision": 5, "rejected": {"revision": 7, "reason": "too hot"}},
        "n/p3": {"revision": 5, "rejected": {"revision": 6, "reason": "an older one"}},
        "n/p4": {"step": 0},  # no revision yet
    }
    clock = FakeClock(lambda: entries)
    result = wait_applied(clock.next_entries, 7, 2, clock=clock.now)
    assert not result.ok and not result.done and result.seconds == pytest.approx(2.0)
    assert result.applied == {"n/p1": 3} and result.rejected == {"n/p2": "too hot"}
    assert result.behind == {"n/p3": 5, "n/p4": "-"}
    assert result.failure(2) == (
        "revision 7 is written, but rejected by the daemon of 1 of 4 processes (n/p2): too hot; "
        "not applied within 2 s by 2 of 4 processes: n/p3 (at revision 5), n/p4 (at revision -)"
    )


def test_wait_applied_tells_a_process_holding_it_unapplied() -> None:
    entries = {
        "n/slow": {"revision": 5, "pending": {"revision": 7, "since": 1000.0}},
        "n/idle": {"revision": 5, "pending": {"revision": 6, "since": 990.0}},  # an older one
        "n/odd": {"revision": 5, "pending": {"revision": 7, "since": "soon"}},  # by hand
    }
    clock = FakeClock(lambda: entries)
    result = wait_applied(clock.next_entries, 7, 2, clock=clock.now)
    assert sorted(result.behind) == ["n/idle", "n/odd", "n/slow"]
    assert result.holding == {"n/slow": 1000.0} and result.as_dict()["holding"] == ["n/slow"]
    assert result.failure(2, now=1012.4) == (
        "revision 7 is written, but not applied within 2 s by 3 of 3 processes: n/idle (at "
        "revision 5), n/odd (at revision 5), n/slow (at revision 5; sent it, nothing applied "
        "for 12 s)"
    )
    # When every one behind holds it, the line says what that means.
    held = {"n/slow": entries["n/slow"], "n/fast": {"revision": 7, "step": 9}}
    clock = FakeClock(lambda: held)
    result = wait_applied(clock.next_entries, 7, 2, clock=clock.now)
    assert result.failure(2, now=1003.0) == (
        "revision 7 is written, but not applied within 2 s by 1 of 2 processes: n/slow (at "
        "revision 5; sent it, nothing applied for 3 s); the change was sent to it, to be taken "
        "at the next apply (a long step, a server with no requests, or a hung process): wait "
        "longer, or see `hotknob status`"
    )


def test_wait_applied_tells_a_refused_key_from_a_later_revision_run() -> None:
    # Both run revision 12, past the written 10; n/p2's daemon refused temperature at 12
    # (a full read of etcd after a reconnect, say): it runs without the written value.
    refused = {"revision": 12, "reason": "too hot", "keys": ["sampling.temperature"]}
    entries = {
        "n/p1": {"revision": 12, "step": 4},
        "n/p2": {"revision": 12, "step": 4, "rejected": refused},
    }
    clock = FakeClock(lambda: entries)
    result = wait_applied(clock.next_entries, 10, 2, clock=clock.now, keys=["sampling.temperature"])
    assert result.applied == {"n/p1": 4} and result.rejected == {"n/p2": "too hot"}
    # A write of another key: n/p2 runs it (its refusal is of a key not written).
    result = wait_applied(clock.next_entries, 10, 2, clock=clock.now, keys=["train.lr"])
    assert result.ok and sorted(result.applied) == ["n/p1", "n/p2"]


def test_wait_applied_says_which_processes_wait_for_a_restart() -> None:
    entries = {
        "n/p1": {"revision": 7, "step": 3, "restart_pending": ["train.batch_size"]},  # daemon
        "n/p2": {"revision": 7, "step": 4, "held": ["train.batch_size"]},  # the process
        "n/p3": {"revision": 8, "step": 5},  # started since: runs it
        "n/p4": {"revision": 7, "step": 6, "held": ["model.width"]},  # not a key written
    }
    clock = FakeClock(lambda: entries)
    result = wait_applied(clock.next_entries, 7, 2, clock=clock.now, keys=["train.batch_size"])
    assert result.ok and result.restart == {
        "n/p1": ["train.batch_size"],
        "n/p2": ["train.batch_size"],
    }
    assert result.as_dict()["restart"] == ["n/p1", "n/p2"]
    assert result.summary().endswith(
        "; train.batch_size restart-only: waits for a restart of 2 of them (n/p1, n/p2)"
    )
