"""A process connected to a daemon that has not acked yet (one with long steps that
reconnected to its restarted daemon while a value changed: it acks the new snapshot only
at its next ``apply``) is seen by ``status`` and waited for by ``set --wait``."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(90)

APP = "unacked"


def _cli(etcd: EtcdServer, *args: str) -> list[str]:
    return [*args, "--app", APP, "--etcd-endpoints", etcd.endpoint]


def _entry(etcd: EtcdServer, name: str) -> dict[str, Any] | None:
    done = etcd.etcdctl("get", f"/hotknob/{APP}/status/{name}", "--print-value-only")
    return dict(json.loads(done.stdout)) if done.stdout.strip() else None


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout:g} s")
        time.sleep(0.1)


def test_a_connected_process_that_has_not_acked_is_in_status_and_in_set_wait(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with (
        DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"]) as d,
        RawClient(d.socket_path, "fast") as fast,
        RawClient(d.socket_path, "slow") as slow,
    ):
        fast.send({"type": "applied", "version": fast.snapshot["version"], "step": 1})
        _wait_for(lambda: _entry(etcd, "n1/fast") is not None, "no entry of n1/fast")
        _wait_for(lambda: _entry(etcd, "n1/slow") is not None, "no entry of n1/slow")
        slow_entry = _entry(etcd, "n1/slow")
        assert slow_entry is not None and "revision" not in slow_entry, slow_entry
        assert slow_entry["pending"]["revision"] == slow.snapshot["revision"], slow_entry

        done = run_cli(*_cli(etcd, "status", "--json"))
        assert done.returncode == 0, done.stderr
        processes = {p["key"]: p for p in json.loads(done.stdout)["processes"]}
        assert sorted(processes) == ["n1/fast", "n1/slow"], processes
        assert processes["n1/fast"]["version"] == fast.snapshot["version"]
        done = run_cli(*_cli(etcd, "status"))
        assert done.returncode == 0, done.stderr
        (row,) = [line for line in done.stdout.splitlines() if line.startswith("n1/slow")]
        assert "pending" in row, done.stdout

        # A change while it holds its snapshot: the healthy process applies it, and --wait
        # names the other as sent it and not applying it.
        wait = subprocess.Popen(
            hotknob_cmd(*_cli(etcd, "set", "train.momentum=0.77", "--wait", "5")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
            stdin=subprocess.DEVNULL,
        )
        try:
            update = fast.next_update(timeout=20)
            fast.send({"type": "applied", "version": update["version"], "step": 2})
            out, err = wait.communicate(timeout=40)
        finally:
            if wait.poll() is None:
                wait.kill()
                wait.wait()
        assert wait.returncode == 1, (out, err)
        assert "not applied within 5 s by 1 of 2 processes: n1/slow (at revision -; " in err, err
        assert "sent it, nothing applied for" in err, err

        slow.close()  # it leaves: its entry goes, the other's stays
        _wait_for(lambda: _entry(etcd, "n1/slow") is None, "n1/slow's entry stays")
        assert _entry(etcd, "n1/fast") is not None
