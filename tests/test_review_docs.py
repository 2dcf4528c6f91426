"""The docs read literally: their commands and snippets run as written.

A new user copies a snippet from docs/distributed.md and expects it to run; these tests
extract each one from the page itself, so a doc edit that breaks one fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTED = ROOT / "docs" / "distributed.md"


def blocks(page: Path, language: str) -> list[str]:
    """The fenced code blocks of ``page`` in ``language``, in page order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", page.read_text(), re.M | re.S)


def without_hotknob_env() -> dict[str, str]:
    """The test's environment without the caller's own hotknob settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HOTKNOB_")}


def wait_all(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str]]:
    """Each process's exit status and output; any still running at the deadline is killed."""
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        results.append((proc.returncode, out))
    return results


def test_the_distributed_python_snippet_runs_on_two_gloo_ranks(tmp_path: Path) -> None:
    """The page's first snippet, as written, trains on two ranks against a real daemon."""
    script = tmp_path / "train.py"
    script.write_text(blocks(DISTRIBUTED, "python")[0])
    with DaemonProcess(tmp_path, app="docs") as daemon:
        common = {
            **without_hotknob_env(),
            "HOTKNOB_SOCKET": str(daemon.socket_path),
            "CUDA_VISIBLE_DEVICES": "",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
        }
        ranks = [
            subprocess.Popen(
                [sys.executable, str(script)],
                env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            for rank in (0, 1)
        ]
        results = wait_all(ranks, timeout=35)
        for rank, (code, out) in enumerate(results):
            assert code == 0, f"rank {rank} exited {code}:\n{out[-3000:]}"
        connected = daemon.events("client_connected")
    assert sorted(e.get("extra_rank") for e in connected) == [0, 1]


def test_the_distributed_shell_commands_reach_etcd(etcd: EtcdServer, tmp_path: Path) -> None:
    """``hotknob set`` of the torchrun example writes, in the environment the block sets up.

    The block's own variables are kept (its etcd endpoint replaced by the test's); its
    ``--wait`` is left out, since no trainer runs here to apply the change.
    """
    (block,) = blocks(DISTRIBUTED, "sh")
    exports = [line for line in block.splitlines() if line.startswith("export ")]
    (set_line,) = [line for line in block.splitlines() if line.startswith("hotknob set ")]
    set_command = re.sub(r"\s*--wait \d+", "", set_line.split("#")[0])
    script = "\n".join([*exports, set_command]).replace("127.0.0.1:2379", etcd.endpoint)
    env = {**without_hotknob_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    shown = run_cli("explain", "train.lr", "--app", "demo", "--etcd-endpoints", etcd.endpoint)
    assert re.search(r"train\.lr\s+0\.01\s+etcd", shown.stdout), shown.stdout
