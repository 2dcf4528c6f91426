"""The examples and ``hotknob demo`` run as a user runs them: a flag value they cannot
use is refused in one line, not a traceback once the run is under way."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess, hotknob_cmd
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]


def run_example(
    script: str, *args: str, socket: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "examples" / script), *args]
    if socket is not None:
        cmd += ["--socket", str(socket)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=45, cwd=ROOT, stdin=subprocess.DEVNULL
    )


@pytest.fixture
def daemon(etcd: EtcdServer, tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(
        tmp_path, app="ex", endpoints=etcd.endpoint, configs=[ROOT / "examples" / "config.yaml"]
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--print-every", "0"], "--print-every"),  # was: ZeroDivisionError in step % 0
        (["--step-delay", "-1"], "--step-delay"),  # was: ValueError from time.sleep
        (["--steps", "-3"], "--steps"),  # was: nothing trained, exit 0
    ],
    ids=["print-every-0", "negative-delay", "negative-steps"],
)
def test_train_refuses_a_flag_it_cannot_use_in_one_line(args: list[str], said: str) -> None:
    done = run_example("train.py", *args, "--socket", "/nonexistent/none.sock")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert said in done.stderr.splitlines()[-1]


def test_train_with_a_step_scheduler_runs_fewer_than_four_steps(
    daemon: DaemonProcess,
) -> None:
    """``--scheduler step`` made StepLR's step size ``steps // 4``: 0 below four steps,
    and StepLR divides by it."""
    done = run_example("train.py", "--steps", "3", "--scheduler", "step", socket=daemon.socket_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step     0" in done.stdout


def test_train_and_generate_say_in_one_line_that_the_log_cannot_be_written(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-folder" / "log.jsonl"
    for script, flag in (("train.py", "--log-file"), ("generate.py", "--log")):
        extra = ["--no-train", "--requests", "1"] if script == "generate.py" else ["--steps", "2"]
        done = run_example(script, flag, str(missing), *extra, socket=daemon.socket_path)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert done.stderr.splitlines()[-1].startswith(f"error: {flag}: "), done.stderr


@pytest.mark.parametrize(
    "args",
    [["--token-delay", "-1"], ["--prompt", ""], ["--requests", "-1"]],
    ids=["negative-delay", "empty-prompt", "negative-requests"],
)
def test_generate_refuses_a_flag_it_cannot_use_in_one_line(args: list[str]) -> None:
    done = run_example("generate.py", "--no-train", *args, "--socket", "/nonexistent/none.sock")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert args[0] in done.stderr.splitlines()[-1]


def test_tune_live_refuses_a_negative_interval_in_one_line() -> None:
    done = run_example("tune_live.py", "--interval", "-1", "--duration", "1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--interval" in done.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--steps", "0"], "--steps"),  # was: the whole demo, then "saw 0" (exit 1)
        (["--step-delay", "-1"], "--step-delay"),  # was: the trainer's traceback
        (["--output", "/nonexistent/demo.png"], "--output"),  # was: failed after the run
    ],
    ids=["steps-0", "negative-delay", "no-output-folder"],
)
def test_demo_refuses_a_flag_before_it_starts_anything(args: list[str], said: str) -> None:
    done = subprocess.run(
        hotknob_cmd("demo", *args),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "working folder" not in done.stdout  # nothing started, no folder made
    assert said in done.stderr


def test_demo_too_short_for_its_changes_stops_at_once_and_says_why() -> None:
    """``--steps 10``: the run ends before the first ``set --wait 30`` sees it apply. The
    demo waited out those 30 s (no process left to apply it), then exited 1 naming only
    the command; now it stops the wait once the trainer is gone, and says what to give."""
    started = time.monotonic()
    done = subprocess.run(
        hotknob_cmd("demo", "--steps", "10"),
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the trainer exited" in done.stderr and "--steps" in done.stderr, done.stderr
    assert took < 25, f"the demo waited {took:.0f} s for a run that had ended"
    match = re.search(r"working folder: (\S+)", done.stdout)
    assert match and not Path(match.group(1)).exists()
