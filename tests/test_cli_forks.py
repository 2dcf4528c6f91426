"""The suite's forked CLI runner (``tests/cli_forks.py``) gives what a new ``hotknob``
process gives: the same exit code, stdout and stderr, with the caller's environment and
folder, and nothing carried over from one command to the next."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.daemon_proc import run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(120)


def _same(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    forked = run_cli(*args, env=env, drop="HOTKNOB_")
    fresh = run_cli(*args, env=env, drop="HOTKNOB_", fresh=True)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode,
        fresh.stdout,
        fresh.stderr,
    ), args
    return forked


def test_help_usage_errors_and_file_checks_match_a_new_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "good.yaml").write_text("train:\n  lr: 0.5\n")
    (tmp_path / "bad.yaml").write_text("train:\n  lr: -3\n")
    assert _same("--help").returncode == 0  # the server runs, started in another folder
    monkeypatch.chdir(tmp_path)  # relative paths: read from the caller's folder
    assert _same("frobnicate").returncode == 2
    assert _same("validate", "good.yaml").returncode == 0
    bad = _same("validate", "good.yaml", "bad.yaml", "missing.yaml")
    assert (
        bad.returncode == 1 and "bad.yaml: train.lr" in bad.stdout and "missing.yaml" in bad.stdout
    )


def test_the_environment_is_the_callers_and_is_not_carried_to_the_next_command(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    common = ("--app", "t", "--etcd-endpoints", etcd.endpoint, "--json")
    with_env = _same("explain", *common, "train.lr", env={"HOTKNOB_PARAM_TRAIN__LR": "0.25"})
    assert with_env.returncode == 0 and "0.25" in with_env.stdout
    without = _same("explain", *common, "train.lr")
    assert without.returncode == 0 and "0.25" not in without.stdout

    bad_schema = _same("validate", str(tmp_path / "x.json"), env={"HOTKNOB_SCHEMA": "nowhere:X"})
    assert bad_schema.returncode != 0 and "nowhere" in bad_schema.stderr


def test_unreachable_etcd_matches_a_new_process() -> None:
    done = _same("get", "train.lr", "--etcd-endpoints", "127.0.0.1:1", "--etcd-timeout", "0.5")
    assert done.returncode == 3 and done.stdout == ""


def test_a_command_past_its_timeout_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli(
            "run",
            "--app",
            "t",
            "--socket",
            str(path),
            "--state-dir",
            str(tmp_path / "s"),
            timeout=3.0,
        )
    assert path.is_socket()  # the daemon was listening; killed, it could not remove it
    with socket.socket(socket.AF_UNIX) as client, pytest.raises(ConnectionRefusedError):
        client.connect(str(path))
