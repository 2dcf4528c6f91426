"""A real ``hotknob run`` in a child process, and a raw protocol client for tests."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hotknob.model_runtime import protocol
from tests import cli_forks


def hotknob_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hotknob.daemon.cli", *args]


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    drop: str = "",
    fresh: bool = False,
) -> Any:
    """Run the CLI to completion; returns the CompletedProcess (text). ``drop``: the
    caller's variables whose names start with it are left out (``HOTKNOB_``).

    The command runs in a fork of a process that has imported the CLI already
    (``tests/cli_forks.py``); ``fresh``: in a new interpreter, ``python -m
    hotknob.daemon.cli``, for a test of what happens before ``main``."""
    base = {k: v for k, v in os.environ.items() if not (drop and k.startswith(drop))}
    if not fresh and cli_forks.usable():
        return cli_forks.run_forked(args, {**base, **(env or {})}, timeout)
    return subprocess.run(
        hotknob_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


class DaemonProcess:
    """``hotknob run`` with its own socket and state dir under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        app: str = "t",
        endpoints: str | None = None,
        configs: Sequence[Path] = (),
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        before_main: str = "",
        fresh: bool = False,
    ):
        """The daemon runs in a fork of a process that has imported the CLI already
        (``tests/cli_forks.py``); ``fresh``: in a new interpreter, ``python -m
        hotknob.daemon.cli``, as does one with ``before_main``: Python run before the
        CLI's modules are imported and its ``main`` runs (a test that sets one of the
        daemon's constants)."""
        self.workdir = workdir
        self.before_main = before_main
        self.fresh = fresh or bool(before_main)
        self.app = app
        self.socket_path = workdir / "sock" / f"{app}.sock"
        self.state_dir = workdir / "state"
        self.log_path = workdir / f"daemon-{app}.log"
        self.args = ["run", "--app", app, "--socket", str(self.socket_path)]
        self.args += ["--state-dir", str(self.state_dir)]
        if endpoints:
            self.args += ["--etcd-endpoints", endpoints]
        for path in configs:
            self.args += ["--config", str(path)]
        self.args += list(extra)
        self.env = {**os.environ, **(env or {})}
        if not endpoints:
            self.env.pop("HOTKNOB_ETCD_ENDPOINTS", None)
        self.proc: subprocess.Popen[bytes] | cli_forks.ForkedProcess | None = None
        self._log_start = 0

    def start(self, timeout: float = 20.0) -> DaemonProcess:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        if self.fresh or not cli_forks.usable():
            self.proc = self._popen()
        else:
            self.proc = cli_forks.start_forked(self.args, self.env, self.log_path, self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if "daemon_ready" in self.log(since_start=True):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"daemon not ready in {timeout} s:\n{self.log()}")

    def _popen(self) -> subprocess.Popen[bytes]:
        command = hotknob_cmd(*self.args)
        if self.before_main:
            main = "import sys\nfrom hotknob.daemon.cli import main\nsys.exit(main())"
            command = [sys.executable, "-c", f"{self.before_main}\n{main}", *self.args]
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                command, stdout=log, stderr=log, env=self.env, stdin=subprocess.DEVNULL
            )

    def log(self, *, since_start: bool = False) -> str:
        """The daemon's log; with ``since_start``, only what this run wrote."""
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def events(self, *names: str) -> list[dict[str, Any]]:
        """The log's JSON lines whose event is one of ``names``, in the order logged."""
        found = []
        for line in self.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") in names:
                found.append(event)
        return found

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 8.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RawClient:
    """Speaks protocol v1 over a plain socket, as any non-Python client would."""

    def __init__(self, path: Path, name: str = "raw", **hello: Any):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self._buf = b""
        self.sock.sendall(protocol.encode(protocol.hello(name, **hello)))
        self.snapshot = self.next()
        assert self.snapshot["type"] == "snapshot", self.snapshot

    def _fill(self, timeout: float) -> bool:
        """Read what arrives within ``timeout``; False if nothing did."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("daemon closed the connection")
        self._buf += chunk
        return True

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._fill(remaining):
                raise TimeoutError(f"no message within {timeout} s")
        line, self._buf = self._buf.split(b"\n", 1)
        return protocol.decode(line)

    def next_update(self, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            message = self.next(timeout)
            if message["type"] == "update":
                return message

    def no_message(self, wait: float = 0.5) -> bool:
        """True if no complete message arrives within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            self._fill(remaining)
        return False

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(protocol.encode(message))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
