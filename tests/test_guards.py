"""Guarded changes end to end: real etcd, a real daemon, a real training run or raw clients."""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon.cli import main as cli_main
from hotknob.daemon.cmd_live import _describe
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli
from tests.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.timeout(120)

APP = "t"
P = f"/hotknob/{APP}/config/"
G = f"/hotknob/{APP}/guards/"
ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "train.py"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def kv(etcd: EtcdServer, key: str) -> tuple[str | None, int]:
    """A key's value (None if absent) and mod revision, read with etcdctl."""
    out = json.loads(etcd.etcdctl("get", key, "-w", "json").stdout)
    kvs = out.get("kvs") or []
    if not kvs:
        return None, 0
    return base64.b64decode(kvs[0]["value"]).decode(), int(kvs[0]["mod_revision"])


def head_revision(etcd: EtcdServer) -> int:
    out = json.loads(etcd.etcdctl("get", "/", "--prefix", "--keys-only", "-w", "json").stdout)
    return int(out["header"]["revision"])


def read_prefix(etcd: EtcdServer, prefix: str) -> dict[str, Any]:
    """Every JSON value under ``prefix`` by key (etcdctl: quicker than a CLI run to poll)."""
    out = json.loads(etcd.etcdctl("get", prefix, "--prefix", "-w", "json").stdout)
    return {
        base64.b64decode(item["key"]).decode(): json.loads(base64.b64decode(item["value"]))
        for item in out.get("kvs") or []
    }


def status_json(etcd: EtcdServer) -> dict[str, Any]:
    done = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint, "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def guard_records(etcd: EtcdServer) -> list[dict[str, Any]]:
    return list(read_prefix(etcd, G).values())


def processes(etcd: EtcdServer) -> list[dict[str, Any]]:
    return [{**v, "key": k} for k, v in read_prefix(etcd, f"/hotknob/{APP}/status/").items()]


def guarded_set(etcd: EtcdServer, *args: str) -> dict[str, Any]:
    done = run_cli("set", "--app", APP, "--etcd-endpoints", etcd.endpoint, "--json", *args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def metrics(step: int, **values: Any) -> dict[str, Any]:
    return {
        "type": "metrics",
        "step": step,
        "latest": {k: v for k, v in values.items()},
        "window": {k: [v] for k, v in values.items()},
    }


def next_event(watcher: RawClient, name: str) -> dict[str, Any]:
    """The first ``event`` message called ``name`` that a ``watch`` connection gets."""
    while True:
        message = watcher.next(timeout=10)
        if message.get("type") == "event" and message.get("event") == name:
            return message


class Watch:
    """``hotknob watch ARGS`` against a daemon, its stdout lines read on a thread into a
    queue (its stderr kept, for the message of a watch that ended)."""

    def __init__(self, daemon: DaemonProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            hotknob_cmd("watch", "--app", APP, "--socket", str(daemon.socket_path), *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, name="test-watch-reader")
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, fragment: str, timeout: float = 30.0) -> list[str]:
        """Lines up to and including the first that holds ``fragment``."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while not seen or fragment not in seen[-1]:
            try:
                seen.append(self.lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"watch printed no {fragment!r} line: {seen}") from None
        return seen

    def next(self, timeout: float = 20.0) -> str:
        """The next line; if none comes, says why (the exit code and stderr of a watch that
        ended)."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            stderr = ""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                stderr = self.proc.stderr.read()
            message = f"watch printed nothing (rc {self.proc.poll()}): {stderr}"
            raise AssertionError(message) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# --- a real training run ------------------------------------------------------------------


def test_a_diverging_lr_is_reverted_by_its_guard_and_training_recovers(
    etcd: EtcdServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: 0.1\n  grad_clip: 1.0\n  momentum: 0.0\n")
    etcd.etcdctl("put", P + "train/lr", "0.1")  # the value the revert must put back
    step_log = tmp_path / "steps.jsonl"
    daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint, configs=[config]).start()
    train_args = ["--socket", str(daemon.socket_path), "--steps", "20000", "--step-delay", "0.01"]
    train = subprocess.Popen(
        [
            *(sys.executable, str(TRAIN), *train_args),
            *("--log-file", str(step_log), "--print-every", "1000"),
        ],
        env={**os.environ, "HOTKNOB_REPORT_EVERY_S": "0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        # The baseline needs reports from before the change: let the loss settle a little.
        def settled() -> bool:
            mine = [p for p in processes(etcd) if "metrics" in p]
            return bool(mine) and mine[0]["metrics"]["step"] >= 200

        wait_for("the run to report 200 steps", settled, timeout=60, every=0.2)
        baseline = processes(etcd)[0]["metrics"]["mean"]["loss"]

        watch = Watch(daemon)
        store = EtcdStore(EtcdOptions.from_strings(etcd.endpoint))
        try:
            watch.until("watching")
            # In this process, so that the unrelated change below surely comes before the
            # revert (a CLI process takes longer to exit than the guard takes to trip).
            argv = ["set", "--app", APP, "--etcd-endpoints", etcd.endpoint, "--json"]
            guard = ["--guard", "loss < 1.5 * baseline", "--window", "300"]
            code = cli_main([*argv, *guard, "train.lr=2.0"])
            # A later, unrelated change: the revert must leave it alone.
            unrelated = store.commit({P + "sampling/temperature": "0.5"})
            assert code == 0
            out = json.loads(capsys.readouterr().out)
            guarded = out["revision"]
            shown = watch.until("REVERTED")[-1]
        finally:
            store.close()
            watch.close()

        (reverted,) = wait_for("the revert logged", lambda: daemon.events("change_reverted"))
        assert reverted["restored"] == {"train.lr": 0.1}
        assert reverted["replaced"] == {"train.lr": 2.0}
        assert reverted["guarded_revision"] == guarded
        assert "failed on 3 reports in a row" in reverted["reason"]
        assert len(reverted["evidence"]) == 3
        assert all(e["values"]["loss"] >= 1.5 * baseline for e in reverted["evidence"])
        revert = reverted["revision"]
        assert guarded < unrelated < revert
        assert (
            f"REVERTED rev {revert} by guard {out['guard']} (the change at rev {guarded}): "
            in shown
        )
        assert "train.lr=0.1 (was 2.0): " in shown and "failed on 3 reports in a row" in shown

        # ONE etcd revision restored the key, ended the guard and annotated who did it.
        assert kv(etcd, P + "train/lr") == ("0.1", revert)
        assert kv(etcd, f"{G}{out['guard']}")[1] == revert
        assert kv(etcd, f"/hotknob/{APP}/meta/last-write")[1] == revert
        assert kv(etcd, P + "sampling/temperature") == ("0.5", unrelated)
        (record,) = status_json(etcd)["guards"]
        assert record["state"] == "reverted" and record["outcome"]["revision"] == guarded

        # Training goes on with the old lr and recovers.
        def steps() -> list[dict[str, Any]]:
            return [json.loads(line) for line in step_log.read_text().splitlines() if line]

        def recovered() -> list[dict[str, Any]] | None:
            rows = steps()
            back = [i for i, r in enumerate(rows) if r["lr"] == pytest.approx(2.0)]
            return rows if back and len(rows) > back[-1] + 150 else None

        rows = wait_for("150 steps after the revert", recovered, timeout=60, every=0.2)
        assert train.poll() is None, "training must not stop"
    finally:
        train.send_signal(signal.SIGINT)
        try:
            train.wait(timeout=15)
        except subprocess.TimeoutExpired:
            train.kill()
            train.wait()
        daemon.stop()

    lrs = [r["lr"] for r in rows]
    first_bad = lrs.index(pytest.approx(2.0))
    last_bad = max(i for i, lr in enumerate(lrs) if lr == pytest.approx(2.0))
    # Both changes landed at step boundaries: an apply at the first step of each lr.
    assert "applied" in rows[first_bad]
    assert "applied" in rows[last_bad + 1] and lrs[last_bad + 1] == pytest.approx(0.1)
    assert all(lr == pytest.approx(2.0) for lr in lrs[first_bad : last_bad + 1])
    assert last_bad - first_bad < 300, "reverted within the window"
    losses = [r["loss"] for r in rows]
    peak = max(losses[first_bad : last_bad + 1])
    assert peak > 3 * baseline, "the loss exploded"
    tail = losses[-100:]
    assert sum(tail) / len(tail) < 1.5 * baseline, "training recovered"
    assert all(r["version"] >= rows[first_bad]["version"] for r in rows[first_bad:])


# --- raw clients: precise reports -------------------------------------------------------------


def report_until_published(client: RawClient, etcd: EtcdServer, name: str, steps: range) -> None:
    for step in steps:
        client.send(metrics(step, loss=1.0))

    def published() -> bool:
        mine = [p for p in processes(etcd) if p["client"] == name]
        return bool(mine) and mine[0].get("metrics", {}).get("step") == steps[-1]

    wait_for("the reports in status", published)


def test_a_guard_that_holds_reverts_nothing_and_is_marked_passed(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    port = free_port()
    guard_file = tmp_path / "guard.yaml"
    guard_file.write_text("guard: loss < 2 * baseline and loss > 0\nwindow: 20\npatience: 2\n")
    extra = ["--node", "n1", "--metrics-addr", f"127.0.0.1:{port}"]
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=extra) as daemon,
        RawClient(daemon.socket_path, "w", watch=True) as watcher,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        report_until_published(client, etcd, "c1", range(1, 6))
        entry = status_json(etcd)["processes"][0]
        assert entry["key"] == "n1/c1"
        assert entry["metrics"]["latest"] == {"loss": 1.0}
        assert entry["metrics"]["mean"] == {"loss": 1.0}
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'hotknob_client_metric{client="c1",metric="loss"} 1.0' in exposition

        out = guarded_set(etcd, "train.lr=0.05", "--guard-file", str(guard_file))
        update = client.next_update()
        assert update["changed"] == {"train.lr": 0.05}
        client.send({"type": "applied", "version": update["version"], "step": 10})
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        # One bad report, then good ones: patience 2 is not exhausted.
        client.send(metrics(11, loss=2.5))
        for step in range(12, 32):
            client.send(metrics(step, loss=1.5))

        def ended() -> dict[str, Any] | None:
            records = [r for r in guard_records(etcd) if r["state"] != "armed"]
            return records[0] if records else None

        record = wait_for("the guard to end", ended)
        assert record["id"] == out["guard"]
        assert record["state"] == "passed"
        assert record["guard"] == "loss < 2 * baseline and loss > 0"
        assert record["baselines"] == {"n1/c1": {"loss": 1.0}}
        assert record["window"] == 20 and record["patience"] == 2
        assert kv(etcd, P + "train/lr")[0] == "0.05"
        assert kv(etcd, P + "train/lr")[1] == out["revision"]
        assert not daemon.events("change_reverted")
        text = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint)
        assert "passed" in text.stdout and "loss=1.5" in text.stdout, text.stdout
        # Logged and sent to watchers (the outcome's own revision must not clash).
        (logged,) = wait_for("guard_passed logged", lambda: daemon.events("guard_passed"))
        assert logged["guard"] == out["guard"] and logged["reason"] == "held for 20 steps"
        assert logged["guarded_revision"] == out["revision"] and logged["clients"] == ["n1/c1"]
        event = next_event(watcher, "guard_passed")
        assert event["guard"] == out["guard"] and event["revision"] > out["revision"]
        line = _describe(event)  # as `hotknob watch` shows it
        assert f"GUARD PASSED {out['guard']} (the change at rev {out['revision']})" in line
        assert line.endswith(": held for 20 steps")


def test_a_guard_survives_a_daemon_restart_and_nan_reverts_at_once(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"]).start()
    try:
        with RawClient(daemon.socket_path, "c1") as client:
            client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
            report_until_published(client, etcd, "c1", range(1, 4))
            out = guarded_set(
                etcd, "train.lr=0.5", "--guard", "loss < 10 * baseline", "--window", "1000"
            )
            update = client.next_update()
            client.send({"type": "applied", "version": update["version"], "step": 5})
            wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        daemon.stop()
        assert not daemon.events("change_reverted")
        assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])

        daemon.start()
        wait_for("the guard armed again", lambda: len(daemon.events("guard_armed")) == 2)
        with RawClient(daemon.socket_path, "c1") as client:
            assert client.snapshot["values"]["train"]["lr"] == 0.5
            client.send({"type": "applied", "version": client.snapshot["version"], "step": 6})
            client.send(metrics(7, loss=1.0))
            client.send(metrics(8, loss="nan"))
            update = client.next_update()
            # train.lr was unset before the guarded change: the revert deletes it again.
            assert update["changed"] == {"train.lr": 0.001}
        # The restored value can reach the client before the revert's log line is written.
        (event,) = wait_for("the revert logged", lambda: daemon.events("change_reverted"))
        assert event["reason"] == "n1/c1 reported loss=nan at step 8"
        assert event["restored"] == {"train.lr": None}
        assert kv(etcd, P + "train/lr") == (None, 0)
        (record,) = guard_records(etcd)
        assert record["state"] == "reverted"
        assert kv(etcd, G + record["id"])[1] == event["revision"]
    finally:
        daemon.stop()


def test_a_change_made_after_the_guarded_one_wins_over_the_guard(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, "w", watch=True) as watcher,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "50")
        update = client.next_update()
        client.send({"type": "applied", "version": update["version"], "step": 1})
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        etcd.etcdctl("put", P + "train/lr", "0.25")  # someone else's later edit
        for step in range(2, 6):
            client.send(metrics(step, loss=5.0))
        wait_for("the guard to stand down", lambda: daemon.events("guard_superseded"))
        assert kv(etcd, P + "train/lr")[0] == "0.25"
        assert not daemon.events("change_reverted")
        (record,) = guard_records(etcd)
        assert record["state"] == "superseded"
        event = next_event(watcher, "guard_superseded")
        assert event["guard"] == out["guard"] and "changed since" in event["reason"]


def test_a_guard_stands_down_as_soon_as_its_keys_are_written_again(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """It judged the overwritten value until its verdict: ``status`` showed it armed for the
    whole window, watching a change that no longer ran."""
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "1000")
        update = client.next_update()
        client.send({"type": "applied", "version": update["version"], "step": 1})
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        etcd.etcdctl("put", P + "train/momentum", "0.5")  # another key: the guard goes on
        assert client.next_update()["changed"] == {"train.momentum": 0.5}
        assert [r["state"] for r in guard_records(etcd)] == ["armed"]
        etcd.etcdctl("put", P + "train/lr", "0.25")  # no report comes, none is needed
        (event,) = wait_for("the guard to stand down", lambda: daemon.events("guard_superseded"))
        assert event["guard"] == out["guard"]
        (record,) = guard_records(etcd)
        assert record["state"] == "superseded" and record["id"] == out["guard"]
        revision = kv(etcd, P + "train/lr")[1]
        assert f"(train.lr at revision {revision})" in record["outcome"]["reason"]
        assert not daemon.events("change_reverted")


def test_a_revert_deletes_an_old_value_the_daemon_had_rejected(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    etcd.etcdctl("put", "--", P + "train/lr", "-1")  # written around hotknob: never in force
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        before = client.snapshot["values"]["train"]["lr"]
        assert before == 0.001
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        out = guarded_set(etcd, "train.lr=2.0", "--guard", "loss < 3", "--window", "50")
        update = client.next_update()
        client.send({"type": "applied", "version": update["version"], "step": 1})
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        client.send(metrics(2, loss="inf"))
        # What was in force before the change comes back: the default, not the -1.
        assert client.next_update()["changed"] == {"train.lr": before}
        (event,) = wait_for("the revert logged", lambda: daemon.events("change_reverted"))
        assert (
            event["restored"] == {"train.lr": None} and event["guarded_revision"] == out["revision"]
        )
        assert kv(etcd, P + "train/lr") == (None, 0)
        (record,) = guard_records(etcd)
        assert record["state"] == "reverted" and record["outcome"]["restored"] == {"train.lr": None}
        # Rejected once, when the daemon read it at its start; the revert was taken.
        (rejected,) = daemon.events("change_rejected")
        assert rejected["revision"] < out["revision"]


def test_a_revert_of_an_old_value_a_union_field_rejects_deletes_it(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # Pydantic names the key once per member of the union: it is deleted once.
    schema = ["--schema", "tests.banded_schema:Clipped"]
    etcd.etcdctl("put", P + "train/clip", '"bad"')  # written around hotknob: never in force
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=schema) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        assert client.snapshot["values"]["train"]["clip"] == 1.0
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        guarded_set(etcd, *schema, "train.clip=2.0", "--guard", "loss < 3", "--window", "50")
        client.send({"type": "applied", "version": client.next_update()["version"], "step": 1})
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        client.send(metrics(2, loss="inf"))
        record = wait_for(
            "the guard to end", lambda: [r for r in guard_records(etcd) if r["state"] != "armed"]
        )[0]
        assert record["state"] == "reverted"
        assert record["outcome"]["restored"] == {"train.clip": None}
        assert kv(etcd, P + "train/clip") == (None, 0)
        assert client.next_update()["values"]["train"]["clip"] == 1.0
        assert not daemon.events("callback_failed")


def test_a_process_done_with_its_window_may_leave_at_once(etcd: EtcdServer, tmp_path: Path) -> None:
    # It leaves while its daemon may still be asking the others about the guard: three
    # runs, as the two can come in either order.
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon:
        for run, pair in enumerate(("train.lr=0.5", "train.momentum=0.5", "sampling.top_k=5")):
            with RawClient(daemon.socket_path, f"c{run}") as client:
                client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
                key = G + guarded_set(etcd, pair, "--guard", "loss < 3", "--window", "20")["guard"]
                update = client.next_update()
                client.send({"type": "applied", "version": update["version"], "step": 10})
                armed = run + 1
                wait_for("armed", lambda n=armed: len(daemon.events("guard_armed")) == n)
                client.send(metrics(30, loss=1.0))  # its window is done; the run ends here
            record = wait_for(
                "the guard to end",
                lambda k=key: (r := read_prefix(etcd, k)[k])["state"] != "armed" and r,
            )
            assert record["state"] == "passed", record


@contextmanager
def two_nodes(
    etcd: EtcdServer, tmp_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[DaemonProcess, DaemonProcess, RawClient, RawClient]]:
    """Two daemons (nodes n1, n2), a process on each, both at step 0 of the first state."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = (
        DaemonProcess(tmp_path / d, endpoints=etcd.endpoint, extra=["--node", n], env=env)
        for d, n in (("a", "n1"), ("b", "n2"))
    )
    with (
        a as d1,
        b as d2,
        RawClient(d1.socket_path, "c1") as c1,
        RawClient(d2.socket_path, "c2") as c2,
    ):
        for client in (c1, c2):
            client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        yield d1, d2, c1, c2


def c2_awaited(
    etcd: EtcdServer, d1: DaemonProcess, d2: DaemonProcess, c1: RawClient, c2: RawClient, guard: str
) -> dict[str, Any]:
    """``train.lr=0.5`` set with ``guard`` over 20 steps, applied by both at step 10; c1 runs
    through its window, and n1 waits for c2's first report since the change. The set's
    output."""
    out = guarded_set(etcd, "train.lr=0.5", "--guard", guard, "--window", "20")
    for client in (c1, c2):
        client.send({"type": "applied", "version": client.next_update()["version"], "step": 10})
    wait_for("armed on both", lambda: d1.events("guard_armed") and d2.events("guard_armed"))
    for step in range(11, 32):
        c1.send(metrics(step, loss=1.0))
    (waiting, *_) = wait_for("n1 to wait for c2", lambda: d1.events("guard_waiting"))
    assert waiting["processes"] == "n2/c2"
    assert guard_records(etcd)[0]["state"] == "armed"
    return out


def test_a_remote_process_that_reports_nothing_after_the_change_is_waited_for_a_while(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # It reported loss before the change, so the guard waits for its first report since
    # (HOTKNOB_GUARD_REPORT_WAIT_S, 30 s by default); it evaluates, silent: then it passes,
    # and the outcome says who was not heard from.
    quick = {"HOTKNOB_GUARD_REPORT_WAIT_S": "2"}
    with two_nodes(etcd, tmp_path, env=quick) as (d1, d2, c1, c2):
        c2.send(metrics(5, loss=1.0))  # before the change; then it evaluates, silent
        wait_for(
            "c2 in status",
            lambda: any(p["key"].endswith("n2/c2") and p.get("metrics") for p in processes(etcd)),
        )
        out = c2_awaited(etcd, d1, d2, c1, c2, "loss < 3")
        assert guard_records(etcd)[0]["reporting"] == ["n2/c2"]
        record = wait_for(
            "the guard to pass",
            lambda: (r := guard_records(etcd)[0])["state"] == "passed" and r,
        )
        outcome = record["outcome"]
        assert outcome["unheard"] == ["n2/c2"], outcome
        assert "n2/c2 applied it but reported no loss within 2 s" in outcome["reason"], outcome
        assert time.time() - outcome["time"] < 30
        assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])


def test_a_remote_process_whose_reports_come_after_the_others_are_done_can_revert(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # Found by hand: a node whose process reports every 5 s got a change that made its loss
    # 50x, and the guard passed on the other node's reports before it said a word.
    with two_nodes(etcd, tmp_path) as (d1, d2, c1, c2):
        for client, name in ((c1, "c1"), (c2, "c2")):
            report_until_published(client, etcd, name, range(1, 4))
        c2_awaited(etcd, d1, d2, c1, c2, "loss < 2 * baseline")
        assert guard_records(etcd)[0]["reporting"] == ["n1/c1", "n2/c2"]
        time.sleep(1.0)  # n1 asks again every 0.5 s, and keeps waiting
        assert guard_records(etcd)[0]["state"] == "armed"
        for step in (20, 30, 40):  # its reports come now: each holds 10 steps, 50x the loss
            c2.send(metrics(step, loss=50.0))
        (event,) = wait_for("the revert", lambda: d2.events("change_reverted"))
        assert "from n2/c2" in event["reason"], event
        assert guard_records(etcd)[0]["state"] == "reverted"


def test_edits_of_other_keys_do_not_move_a_remote_process_s_window(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with two_nodes(etcd, tmp_path) as (d1, d2, c1, c2):
        guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "20")
        for client in (c1, c2):
            client.send({"type": "applied", "version": client.next_update()["version"], "step": 10})
        wait_for("armed on both", lambda: d1.events("guard_armed") and d2.events("guard_armed"))
        step = 10
        for k in range(1, 4):  # an edit of another key every 10 steps, acknowledged
            for _ in range(10):
                step += 1
                for client in (c1, c2):
                    client.send(metrics(step, loss=1.0))
            etcd.etcdctl("put", P + "sampling/top_k", str(k))
            for client in (c1, c2):
                client.send(
                    {"type": "applied", "version": client.next_update()["version"], "step": step}
                )
        for client in (c1, c2):  # both are 20 steps past the guarded change's
            client.send(metrics(step + 1, loss=1.0))
        wait_for("the guard to pass", lambda: guard_records(etcd)[0]["state"] == "passed")


def test_a_revert_the_daemon_would_reject_ends_the_guard_blocked(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    schema = ["--schema", "tests.banded_schema:Banded"]
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=schema) as daemon,
        RawClient(daemon.socket_path, "w", watch=True) as watcher,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        out = guarded_set(etcd, *schema, "band.hi=20", "--guard", "loss < 3", "--window", "50")
        update = client.next_update()
        client.send({"type": "applied", "version": update["version"], "step": 1})
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        # A later, valid edit of another key that holds only while hi is 20.
        later = guarded_set(etcd, *schema, "band.lo=15")
        update = client.next_update()
        client.send({"type": "applied", "version": update["version"], "step": 2})
        client.send(metrics(3, loss=5.0))
        client.send(metrics(4, loss=5.0))
        client.send(metrics(5, loss=5.0))
        record = wait_for(
            "the guard to end", lambda: [r for r in guard_records(etcd) if r["state"] != "armed"]
        )[0]
        assert record["state"] == "blocked"
        reason = record["outcome"]["reason"]
        assert "failed on 3 reports in a row" in reason and "not reverted" in reason, reason
        assert "lo must not exceed hi" in reason, reason
        # Nothing was restored: the configuration the daemon serves stays valid and whole.
        assert kv(etcd, P + "band/hi") == ("20", out["revision"])
        assert kv(etcd, P + "band/lo") == ("15", later["revision"])
        (logged,) = wait_for("guard_blocked logged", lambda: daemon.events("guard_blocked"))
        assert logged["level"] == "warning" and logged["reason"] == reason
        assert next_event(watcher, "guard_blocked")["guard"] == out["guard"]
        assert not daemon.events("change_reverted") and not daemon.events("change_rejected")
        assert client.no_message()
        assert (
            "blocked" in run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint).stdout
        )


def test_a_process_whose_own_baseline_lacks_a_metric_is_judged_on_the_pooled_one(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"]) as daemon,
        RawClient(daemon.socket_path, "c1") as c1,
        RawClient(daemon.socket_path, "c2") as c2,
    ):
        for client in (c1, c2):
            client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        c1.send(metrics(1, loss=1.0))  # c1 reported only loss before the change
        c2.send(metrics(1, loss=1.0, grad=4.0))
        wait_for("both in status", lambda: sum("metrics" in p for p in processes(etcd)) == 2)
        guard = "loss < 2 * baseline and grad < 2 * baseline"
        guarded_set(etcd, "train.lr=0.5", "--guard", guard, "--window", "100", "--patience", "1")
        assert guard_records(etcd)[0]["baselines"] == {
            "n1/c1": {"loss": 1.0},
            "n1/c2": {"loss": 1.0, "grad": 4.0},
        }
        for client in (c1, c2):
            update = client.next_update()
            client.send({"type": "applied", "version": update["version"], "step": 2})
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        c1.send(metrics(3, loss=1.0, grad=7.0))  # grad within 2x c2's 4.0 (the pooled one)
        c1.send(metrics(4, loss=50.0, grad=1.0))  # loss 50x c1's own: fails
        (event,) = wait_for("the revert", lambda: daemon.events("change_reverted"))
        (evidence,) = event["evidence"]
        assert evidence["step"] == 4 and evidence["baselines"] == {"loss": 1.0, "grad": 4.0}
        assert not daemon.events("callback_failed") and not daemon.events("event_failed")


def test_a_client_name_with_a_slash_is_judged_on_its_own_baseline(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"]) as daemon,
        RawClient(daemon.socket_path, "job/a") as a,
        RawClient(daemon.socket_path, "job/b") as b,
    ):
        for client in (a, b):
            client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        a.send(metrics(1, loss=1.0))
        b.send(metrics(1, loss=10.0))
        wait_for("both in status", lambda: sum("metrics" in p for p in processes(etcd)) == 2)
        guard = ["--guard", "loss < 2 * baseline", "--window", "100", "--patience", "1"]
        guarded_set(etcd, "train.lr=0.5", *guard)
        assert set(guard_records(etcd)[0]["baselines"]) == {"n1/job_a", "n1/job_b"}
        for client in (a, b):
            update = client.next_update()
            client.send({"type": "applied", "version": update["version"], "step": 2})
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        a.send(metrics(3, loss=5.0))  # 5x its own 1.0 (under 2x the pooled mean, 5.5)
        (event,) = wait_for("the revert", lambda: daemon.events("change_reverted"))
        assert event["evidence"][0]["baselines"] == {"loss": 1.0}


def test_a_process_that_goes_back_to_an_earlier_step_is_watched_from_there(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 1000})
        guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "20")
        update = client.next_update()
        client.send({"type": "applied", "version": update["version"], "step": 1000})
        wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
        client.send(metrics(1001, loss=1.0))
        # It reloads its step-900 checkpoint (same process): its window starts again at 900,
        # and every report is checked (before, none below step 1000 was).
        client.send(metrics(900, loss=1.0))
        client.send(metrics(915, loss=1.0))
        client.send(metrics(916, loss="nan"))
        (event,) = wait_for("the revert on NaN", lambda: daemon.events("change_reverted"))
        assert event["reason"] == f"{socket.gethostname()}/c1 reported loss=nan at step 916"
        (record,) = guard_records(etcd)
        assert record["state"] == "reverted"


@contextmanager
def two_nodes_mid_window(
    etcd: EtcdServer, tmp_path: Path
) -> Iterator[tuple[DaemonProcess, DaemonProcess, RawClient, RawClient, dict[str, Any]]]:
    """Two daemons (nodes n1, n2), a process on each, a guarded change with a window of 20
    that both applied at step 10; n2's process has reported once, n1's ran through its
    window, and n1 waits for n2's."""
    with two_nodes(etcd, tmp_path) as (d1, d2, c1, c2):
        out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "20")
        for client in (c1, c2):
            update = client.next_update()
            client.send({"type": "applied", "version": update["version"], "step": 10})
        wait_for("armed on both", lambda: d1.events("guard_armed") and d2.events("guard_armed"))
        c2.send(metrics(11, loss=1.0))  # n2's process: mid-window
        wait_for(
            "c2's report in status",
            lambda: any(p["key"].endswith("n2/c2") and p.get("metrics") for p in processes(etcd)),
        )
        for step in range(11, 32):  # n1's process runs through its window
            c1.send(metrics(step, loss=1.0))
        # n1 has asked whether n2's process is done, and was told no.
        wait_for("n1 to wait for n2", lambda: d1.events("guard_waiting"))
        assert [r["state"] for r in guard_records(etcd)] == ["armed"]
        yield d1, d2, c1, c2, out


def test_a_guard_passes_only_when_every_node_s_processes_are_done(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with two_nodes_mid_window(etcd, tmp_path) as (_, _, _, c2, out):
        hint = "waiting for the end of the window of n2/c2; the furthest from its end: n2/c2, "
        hint += "at step 11 of a window to 30, last report "  # n1's c1 is done
        wait_for(
            "status to say whom the guard waits for",
            lambda: (
                hint in run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint).stdout
            ),
        )
        # Once n2's process is done too, n2 sees that n1's are (from their status): passed.
        wait_for(
            "c1's last report in status",
            lambda: any(
                p["key"].endswith("n1/c1") and p["metrics"]["step"] == 31 for p in processes(etcd)
            ),
        )
        c2.send(metrics(30, loss=1.0))
        record = wait_for(
            "the guard to pass", lambda: [r for r in guard_records(etcd) if r["state"] != "armed"]
        )[0]
        assert record["state"] == "passed" and record["outcome"]["node"] == "n2"
        assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])


def etcd_ranges(etcd: EtcdServer) -> float:
    """How many Range (read) calls etcd has served, from its metrics."""
    with urllib.request.urlopen(f"{etcd.client_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("grpc_server_handled_total{") and 'grpc_method="Range"' in line
    )


def test_a_daemon_waiting_on_another_node_reads_its_status_less_and_less_often(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # n1 is done; n2's process, which reported before the change, is silent since. n1
    # reads every process's status entry to know when n2's is done: every 0.5 s at first,
    # then twice as long after each read, up to 4 s (with a hundred daemons waiting on one
    # slow node, hundreds of reads a second of the whole status prefix otherwise): 3 reads
    # in 6 s, 12 at a steady 0.5 s. The daemons' watchers read too (a probe of a silent
    # stream every 3 s): counted over 6 s before the guard, on the same daemons.
    with two_nodes(etcd, tmp_path) as (d1, d2, c1, c2):
        report_until_published(c2, etcd, "c2", range(1, 4))  # then it goes silent
        before = etcd_ranges(etcd)
        time.sleep(6.0)
        background = etcd_ranges(etcd) - before
        c2_awaited(etcd, d1, d2, c1, c2, "loss < 3")
        before = etcd_ranges(etcd)
        time.sleep(6.0)
        reads = etcd_ranges(etcd) - before - background
        assert reads <= 6, (reads, background)
        assert [r["state"] for r in guard_records(etcd)] == ["armed"]
        assert d1.events("guard_waiting")[-1]["count"] == 1


def test_a_process_of_another_node_still_in_its_window_can_revert(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with two_nodes_mid_window(etcd, tmp_path) as (_, d2, _, c2, _):
        c2.send(metrics(15, loss="nan"))  # inside c2's window
        (event,) = wait_for("the revert", lambda: d2.events("change_reverted"))
        assert event["reason"] == "n2/c2 reported loss=nan at step 15"
        assert [r["state"] for r in guard_records(etcd)] == ["reverted"]


def test_malformed_records_are_skipped_and_the_others_armed(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    keys = {"train.lr": {"old": 0.1, "existed": True, "new": 0.2}}
    bad = [
        {"id": "0a", "guard": "loss < 3", "window": 1e999, "patience": 3, "keys": keys},
        {"id": "0b", "guard": "loss < 3", "window": 10, "state": "passed", "outcome": "held"},
        {"id": "0c", "guard": "1 < 2", "window": 10, "keys": keys},  # reads no metric
        {"id": "0d", "guard": "loss < 3", "window": "soon", "keys": keys},
        # Numbers that could not be written back (JSON has no infinity): status and the
        # daemon's reports would fail on every use of the record.
        {"id": "0f", "guard": "loss < 3", "window": 10, "keys": keys, "created": 1e999},
        {"id": "0g", "guard": "loss < 3", "window": 10, "keys": keys,
         "baselines": {"n/c": {"loss": 1e999}}},
        {"id": "0h", "guard": "loss < 3", "window": 10, "keys": keys, "reporting": "n/c"},
    ]  # fmt: skip
    for record in bad:
        text = json.dumps(record).replace("Infinity", "1e999")
        etcd.etcdctl("put", G + str(record["id"]), text)
    etcd.etcdctl("put", G + "0e", "[" * 20_000 + "]" * 20_000)  # too deep for a parser
    out = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "100")
    done = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint, "--json")
    assert done.returncode == 0, done.stderr
    # 0c is a record (its guard is checked when it is armed); the others are not shown.
    assert {r["id"] for r in json.loads(done.stdout)["guards"]} == {"0c", out["guard"]}
    text = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint)
    assert text.returncode == 0 and out["guard"] in text.stdout, text.stderr
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon:
        (armed,) = wait_for("the valid guard armed", lambda: daemon.events("guard_armed"))
        assert armed["guard"] == out["guard"]
        wait_for(
            "every bad record reported", lambda: len(daemon.events("guard_record_invalid")) >= 8
        )
        invalid = daemon.events("guard_record_invalid")
        names = {e.get("key", e.get("guard", "")).rsplit("/", 1)[-1] for e in invalid}
        assert names == {"0a", "0b", "0c", "0d", "0e", "0f", "0g", "0h"}
        assert not daemon.events("event_failed") and not daemon.events("guard_record_failed")


# --- refused before anything is written ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--guard", "loss < * 2", "--window", "300"], 1, "at column 8"),
        (["--guard", "loss < 1.5 / baseline", "--window", "9"], 1, "division is not supported"),
        (["--guard", "loss < 1.5 * baseline", "--window", "300"], 1, "no process of app"),
        (["--guard", "loss < 2"], 2, "needs --window"),
        (["--window", "300"], 2, "need --guard"),
        (["--guard", "loss < 2", "--window", "0"], 2, "--window must be"),
        (["--guard", "baseline(loss) > 1", "--window", "5"], 1, "read at least one reported"),
    ],
)
def test_a_bad_guard_is_refused_before_anything_is_written(
    etcd: EtcdServer, args: list[str], code: int, fragment: str
) -> None:
    before = head_revision(etcd)
    done = run_cli("set", "--app", APP, "--etcd-endpoints", etcd.endpoint, "train.lr=3e-4", *args)
    assert done.returncode == code, done.stderr
    assert fragment in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, "one clear line, no traceback"
    assert head_revision(etcd) == before
    assert kv(etcd, P + "train/lr") == (None, 0)
