"""``hotknob`` commands run in processes forked from one that has imported the CLI already.

A ``hotknob`` process spends about half a second, most of its time, importing pydantic,
pydantic-settings, gRPC and the etcd client before ``main`` runs; the suite runs several
hundred commands. Here a server process (the standard library's ``forkserver``) imports
them once, and each command runs ``main`` in a fresh fork of it: a process of its own, as
before, with its own environment, descriptors 0, 1 and 2 (``/dev/null`` and two files),
exit code and ``sys.argv``. What such a process does not repeat is the interpreter's start
and the imports; the tests of those (a Ctrl-C while loading, the console script) run the
CLI as a new interpreter (``run_cli(..., fresh=True)``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Imported by the server before it forks: all that any command would import itself.
PRELOAD = [
    "hotknob.daemon.cli",
    "hotknob.daemon.cmd_config",
    "hotknob.daemon.cmd_etcd",
    "hotknob.daemon.cmd_live",
    "hotknob.daemon.cmd_history",
    "hotknob.daemon.app",
    "hotknob.daemon.logs",
    "hotknob.daemon.etcd_store",
    "tests.cli_forks",
]

_context: Any = None
_owner = os.getpid()


def _forkserver() -> Any:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _context = context
    return _context


def usable() -> bool:
    """False in a process forked by a test (a worker process that runs a command): the
    server is its parent's child, not its own, and it runs the command as a new process."""
    return os.getpid() == _owner


def server_pids() -> set[int]:
    """The server and the resource tracker that multiprocessing starts beside it: this
    process's children for the rest of its life, once a command has run."""
    from multiprocessing import forkserver, resource_tracker

    servers = (
        (forkserver._forkserver, "_forkserver_pid"),
        (resource_tracker._resource_tracker, "_pid"),
    )
    return {pid for owner, name in servers if (pid := getattr(owner, name, None))}


def _command(args: Sequence[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the forked process: the folder, environment and descriptors of
    ``subprocess.Popen(..., stdin=DEVNULL, stdout=OUT, stderr=ERR, env=env)`` (``OUT`` and
    ``ERR`` opened to append; one file for both where they are the same path), then
    ``before_main`` and the CLI's ``main``."""
    os.chdir(cwd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, out), (2, err)):
        if fd == 2 and err == out:
            os.dup2(1, 2)
            continue
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.environ.clear()
    os.environ.update(env)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # as the CLI's import does, once
    from hotknob.daemon import cli

    sys.argv = [cli.__file__, *args]
    # A new ``python -m`` puts its folder first, then what PYTHONPATH names: a schema
    # module there is found.
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:0] = [cwd, *extra]
    sys.exit(cli.main(list(args)))


class ForkedProcess:
    """What the tests use of a ``subprocess.Popen``, for a forked ``hotknob`` process."""

    def __init__(self, process: Any, args: list[str]):
        self._process = process
        self.args = args
        self.pid: int = process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code; minus the signal's number for a death by a signal, as Popen's."""
        code: int | None = self._process.exitcode
        return code

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_forked(args: Sequence[str], env: dict[str, str], out: Path, err: Path) -> ForkedProcess:
    """Start ``hotknob ARGS`` in a forked process, stdout and stderr appended to the files
    ``out`` and ``err`` (the same path: one file)."""
    process = _forkserver().Process(
        target=_command, args=(list(args), env, os.getcwd(), str(out), str(err))
    )
    process.start()
    return ForkedProcess(process, ["hotknob", *args])


def run_forked(
    args: Sequence[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``hotknob ARGS`` to completion in a forked process; as ``subprocess.run`` with
    ``capture_output=True, text=True``, ``subprocess.TimeoutExpired`` included."""
    with tempfile.TemporaryDirectory(prefix="hk-cli-") as folder:
        out, err = Path(folder, "out"), Path(folder, "err")
        process = start_forked(args, env, out, err)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        return subprocess.CompletedProcess(
            process.args,
            code,
            out.read_text() if out.exists() else "",
            err.read_text() if err.exists() else "",
        )
