"""examples/tune_live.py against a real etcd, a real daemon and examples/train.py training.

The tuner reads the reported loss from ``status``, and on a plateau halves ``train.lr``
with ``set --wait``: the run takes it without a restart, and the tuner goes on only once
every process applied it (and, with a guard, once the guard passed or reverted it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
APP = "tune"


def start_training(daemon: DaemonProcess, *extra: str) -> subprocess.Popen[str]:
    """examples/train.py on ``daemon``'s socket, reporting every 0.2 s, for long enough."""
    env = {**os.environ, "HOTKNOB_REPORT_EVERY_S": "0.2"}
    return subprocess.Popen(
        [
            *(sys.executable, str(ROOT / "examples" / "train.py"), "--app", APP),
            *("--socket", str(daemon.socket_path), "--steps", "100000"),
            *("--step-delay", "0.005", "--print-every", "100000", *extra),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_tuner_halves_the_rate_of_a_live_run_and_waits_for_it(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: 0.2\n  grad_clip: 1.0\n")
    extra = ["--config", str(config), "--status-every", "0.5", "--node", "n1"]
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=extra) as daemon:
        log = tmp_path / "train.jsonl"
        train = start_training(daemon, "--log-file", str(log))
        try:
            # --min-improvement 1: no look improves, so each (with a newer step) is a
            # plateau: 0.2 -> 0.1, then 0.05 would be under --min-lr: done.
            tuner = subprocess.run(
                [
                    *(sys.executable, str(ROOT / "examples" / "tune_live.py"), "--app", APP),
                    *("--etcd-endpoints", etcd.endpoint, "--config", str(config)),
                    *("--interval", "0.3", "--patience", "1", "--min-improvement", "1"),
                    *("--min-lr", "0.06", "--duration", "60", "--apply-timeout", "30"),
                ],
                capture_output=True,
                text=True,
                timeout=90,
            )
        finally:
            train.terminate()
            _, train_err = train.communicate(timeout=30)
    assert tuner.returncode == 0, (tuner.stdout, tuner.stderr, train_err)
    assert "plateau: train.lr 0.2 -> 0.1 (etcd revision" in tuner.stdout, tuner.stdout
    assert "applied by 1 process(es) within" in tuner.stdout, tuner.stdout
    assert "train.lr 0.1 is at the floor (0.06): done" in tuner.stdout, tuner.stdout
    got = etcd.etcdctl("get", f"/hotknob/{APP}/config/train/lr", "--print-value-only")
    assert got.stdout.strip() == "0.1"
    # The run took it live: its steps went on at the new rate, in the same process.
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rates = [row["lr"] for row in rows]
    assert rates[0] == pytest.approx(0.2) and rates[-1] == pytest.approx(0.1), rates[-5:]
    assert [row["step"] for row in rows] == list(range(len(rows)))


def test_the_tuner_reports_a_revert_goes_on_and_stops_cleanly_without_a_verdict(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: 0.2\n  grad_clip: 1.0\n")
    extra = ["--config", str(config), "--status-every", "0.5", "--node", "n1"]
    tune = [
        *(sys.executable, str(ROOT / "examples" / "tune_live.py"), "--app", APP),
        *("--etcd-endpoints", etcd.endpoint, "--config", str(config)),
        *("--interval", "0.3", "--patience", "1", "--min-improvement", "1", "--duration", "60"),
    ]
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=extra) as daemon:
        train = start_training(daemon)
        try:
            # A guard that always fails: each halving is reverted, and the tuner goes on.
            reverting = ["--guard", "loss < 0.00001", "--window", "30", "--max-changes", "2"]
            reverted = subprocess.run(
                [*tune, *reverting, "--apply-timeout", "30"],
                capture_output=True,
                text=True,
                timeout=90,
            )
            # A guard whose window outlasts --apply-timeout: no verdict in time, a clean stop.
            undecided = ["--guard", "loss < 1000", "--window", "1000000"]
            stopped = subprocess.run(
                [*tune, *undecided, "--apply-timeout", "3"],
                capture_output=True,
                text=True,
                timeout=90,
            )
        finally:
            train.terminate()
            _, train_err = train.communicate(timeout=30)
    assert reverted.returncode == 0, (reverted.stdout, reverted.stderr, train_err)
    assert "Traceback" not in reverted.stderr, reverted.stderr
    lines = reverted.stdout.splitlines()
    reverts = [line for line in lines if " reverted it: 'loss < 0.00001' failed on " in line]
    assert len(reverts) == 2, reverted.stdout
    assert all(line.endswith("; going on at train.lr 0.2") for line in reverts), reverts
    assert sum("plateau: train.lr 0.2 -> 0.1 (etcd revision" in line for line in lines) == 2
    assert stopped.returncode == 1, (stopped.stdout, stopped.stderr)
    assert "Traceback" not in stopped.stderr, stopped.stderr
    last = stopped.stdout.splitlines()[-1]
    assert last.startswith("tune_live: stopped: the change is applied, but guard "), last
    assert last.endswith(" (give --apply-timeout the time the guard's window takes)"), last
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tune_live.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "with --guard, for the guard to pass or revert it" in " ".join(help_text.split())
