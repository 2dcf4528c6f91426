"""``hotknob demo`` end to end, shorter: a real PNG, live changes landed, nothing left running."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon_proc import hotknob_cmd
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(proc.name))
    return found


def _status_field(pid: int, name: str) -> str | None:
    """A field of ``/proc/PID/status``; None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next(
        (line.split()[1] for line in text.splitlines() if line.startswith(name + ":")), None
    )


def workdir_of(output: str) -> str:
    match = re.search(r"working folder: (\S+)", output)
    assert match, output
    return match.group(1)


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    png = tmp_path / "demo.png"
    done = subprocess.run(
        hotknob_cmd("demo", "--steps", "160", "--step-delay", "0.03", "--output", str(png)),
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    landed = re.findall(r"version (\d+) applied at step (\d+)", done.stdout)
    assert len(landed) == 2, done.stdout
    steps = [int(step) for _, step in landed]
    assert 56 <= steps[0] < steps[1] < 160  # each landed after its `hotknob set` at 35 % / 70 %
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400
    assert len(data) > 20_000, "a plot with two panels and data is not this small"
    workdir = workdir_of(done.stdout)
    assert not Path(workdir).exists()
    assert processes_mentioning(workdir) == []


@pytest.mark.parametrize(
    ("signum", "said"),
    [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "SIGTERM")],
    ids=["ctrl-c", "sigterm"],
)
def test_demo_stops_everything_on_ctrl_c_or_sigterm(
    tmp_path: Path, signum: signal.Signals, said: str
) -> None:
    proc = subprocess.Popen(
        hotknob_cmd(
            "demo", "--steps", "2000", "--step-delay", "0.02", "--output", str(tmp_path / "x.png")
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    output = ""
    deadline = time.monotonic() + 60
    while "training train.py" not in output:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, output
        output += line
    workdir = workdir_of(output)
    children = processes_mentioning(workdir)
    assert children, "the demo's daemon should be running"
    for pid in children:  # none started with a stop signal blocked
        blocked = int(_status_field(pid, "SigBlk") or "0", 16)
        assert not blocked & (1 << (signal.SIGINT - 1) | 1 << (signal.SIGTERM - 1)), pid
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, output + rest
    assert f"{said}: stopping everything" in rest
    deadline = time.monotonic() + 10
    while processes_mentioning(workdir):
        assert time.monotonic() < deadline, "a process the demo started outlived it"
        time.sleep(0.1)
    assert not (tmp_path / "x.png").exists()


def etcd_keys(etcd: EtcdServer) -> dict[str, str]:
    out = json.loads(etcd.etcdctl("get", "/", "--prefix", "-w", "json").stdout)
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode()
        for kv in out.get("kvs") or []
    }


def test_demo_uses_the_etcd_it_is_given_and_leaves_a_users_keys_alone(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    users = {
        "/hotknob/demo/config/train/lr": "0.5",  # README's hand-run example uses --app demo
        "/hotknob/demo/config/train/momentum": "0.9",
        "/hotknob/mine/config/train/lr": "0.3",
    }
    for key, value in users.items():
        etcd.etcdctl("put", key, value)
    env = {
        **os.environ,
        "HOTKNOB_ETCD_ENDPOINTS": "127.0.0.1:1",  # the flag wins over the variable
        # meant for a real job: the demo's children must not see them
        "HOTKNOB_APP": "mine",
        "HOTKNOB_PARAM_TRAIN__LR": "0.3",  # would shadow the demo's live changes
        "HOTKNOB_METRICS_ADDR": "256.0.0.1:1",  # would stop its daemon from starting
    }
    png = tmp_path / "demo.png"
    done = subprocess.run(
        hotknob_cmd(
            "demo", "--etcd-endpoints", etcd.endpoint, "--steps", "160", "--step-delay", "0.03",
            "--output", str(png),
        ),
        capture_output=True, text=True, timeout=110, cwd=ROOT, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = re.search(r"using etcd at (\S+), under the app (demo-[0-9a-f]+)", done.stdout)
    assert match and match.group(1) == etcd.endpoint, done.stdout[:2000]
    assert "throwaway" not in done.stdout
    assert len(re.findall(r"version \d+ applied at step \d+", done.stdout)) == 2, done.stdout
    assert png.exists()
    # Only the user's keys are left, as they were: the demo wrote under its own app only,
    # and deleted all of it at the end.
    assert etcd_keys(etcd) == users
