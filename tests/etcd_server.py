"""Throwaway etcd servers for tests: real ``etcd`` processes on free loopback ports.

``EtcdServer`` is one member with its own temporary data directory; ``EtcdCluster``
is three members on loopback. Both clean up everything they start: ``stop()`` sends
SIGTERM, then SIGKILL, and always reaps the process, so the suite's leak fixture
sees no child left behind. Ports are picked free by binding port 0 just before the
start; a clash with another process is retried.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

_START_ATTEMPTS = 3
_PROBE_S = 5.0  # the longest one health probe may take


def find_binary(name: str) -> str:
    """The venv's copy of ``name`` (next to the interpreter), else the one on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class EtcdServer:
    """One etcd member; ``restart()`` keeps its ports and data, so revisions survive."""

    def __init__(
        self,
        name: str = "default",
        *,
        data_dir: Path | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="hotknob-etcd-"))
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self._initial_cluster = initial_cluster
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        cluster = self._initial_cluster or f"{self.name}={self.peer_url}"
        return [
            find_binary("etcd"),
            "--name", self.name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", cluster,
            "--initial-cluster-state", "new",
            "--log-level", "error",
            *self._extra_args,
        ]  # fmt: skip

    def launch(self) -> None:
        """Start the process without waiting for health (a cluster starts all first)."""
        if self.running():
            return
        log = open(self._log, "ab")  # noqa: SIM115 (the child keeps it; closed right below)
        try:
            self._proc = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()

    def start(self, timeout: float = 10.0) -> EtcdServer:
        """Start and wait until healthy; on a port clash pick new ports (first start only)."""
        fresh = not (self.data_dir / "data").exists()
        for attempt in range(_START_ATTEMPTS):
            self.launch()
            try:
                self.wait_healthy(timeout)
                return self
            except RuntimeError:
                self.stop()
                if not fresh or self._initial_cluster or attempt == _START_ATTEMPTS - 1:
                    raise
                # Most often another process took a port between free_port() and the
                # bind: the next try starts afresh on new ports.
                shutil.rmtree(self.data_dir / "data", ignore_errors=True)
                self.client_port, self.peer_port = free_port(), free_port()
            except BaseException:
                self.stop()  # the caller never gets this object, so nothing else would
                raise
        raise AssertionError("unreachable")

    def wait_healthy(self, timeout: float = 10.0) -> None:
        """Wait until ``etcdctl endpoint health`` succeeds; raise with the log tail if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            if _port_open(self.client_port):
                # On a loaded machine etcdctl itself can take seconds to start: a probe
                # that runs out of time is one more "not yet", not the end of the wait.
                probe_s = max(2.0, min(_PROBE_S, deadline - time.monotonic()))
                try:
                    done = self.etcdctl("endpoint", "health", check=False, timeout=probe_s)
                except subprocess.TimeoutExpired:
                    continue
                if done.returncode == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"etcd {self.name} not healthy on {self.endpoint}: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self._log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, sig)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets open but answers nothing (a hung server).
        Returns once every thread of it has stopped: the signal is delivered as the process
        is next scheduled, and on a loaded machine it could still answer a request made
        just after ``kill`` returned."""
        self._signal(signal.SIGSTOP)
        if self._proc is None:
            return
        tasks = Path(f"/proc/{self._proc.pid}/task")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                states = [
                    (t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()
                ]
            except (OSError, IndexError):
                return  # gone, or no /proc: as before
            if all(state in ("T", "t") for state in states):
                return
            time.sleep(0.001)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap: a crash, no graceful shutdown."""
        if self._proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGKILL)
        self._proc.wait()
        self._proc = None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps. Idempotent."""
        if self._proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self._proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (if running) and start again on the same ports with the same data."""
        self.stop()
        self.launch()
        self.wait_healthy(timeout)

    def close(self) -> None:
        """Stop and remove the data directory (if this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            try:
                self._log.unlink()
            except OSError:
                pass

    def etcdctl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 10.0,
        endpoints: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``etcdctl`` (API v3) against this member; raise on failure when ``check``."""
        env = {**os.environ, "ETCDCTL_API": "3"}
        cmd = [
            find_binary("etcdctl"),
            "--endpoints",
            endpoints or self.endpoint,
            "--dial-timeout",
            "2s",
            "--command-timeout",
            f"{max(timeout - 1.0, 1.0)}s",
            *args,
        ]
        done = subprocess.run(
            cmd, input=input, capture_output=True, text=True, env=env, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class EtcdCluster:
    """Three (or ``size``) members on loopback, each with its own ports and data dir."""

    def __init__(self, size: int = 3) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="hotknob-etcd-cluster-"))
        self.members = [
            EtcdServer(f"m{i}", data_dir=self._root / f"m{i}")  # ports: _new_ports
            for i in range(size)
        ]
        self._new_ports()
        for member in self.members:
            member.data_dir.mkdir(parents=True)

    def _new_ports(self) -> None:
        """Fresh client and peer ports for every member, and the initial cluster they name."""
        for member in self.members:
            member.client_port, member.peer_port = free_port(), free_port()
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member._initial_cluster = initial

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        """Start every member and wait until each is healthy. A first start that fails
        (most often another process took a port between ``free_port()`` and etcd's bind,
        as with one server) is tried again from empty data dirs on new ports."""
        for attempt in range(_START_ATTEMPTS):
            for member in self.members:
                member.launch()
            try:
                for member in self.members:
                    member.wait_healthy(timeout)
                return self
            except RuntimeError:
                self.stop()
                if attempt == _START_ATTEMPTS - 1:
                    raise
                for member in self.members:
                    shutil.rmtree(member.data_dir / "data", ignore_errors=True)
                self._new_ports()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def leader(self) -> EtcdServer:
        """The member that reports itself as leader (``etcdctl endpoint status``)."""
        for member in self.members:
            if not member.running():
                continue
            done = member.etcdctl("endpoint", "status", "-w", "json", check=False)
            if done.returncode != 0:
                continue
            for status in json.loads(done.stdout):
                header = status["Status"]["header"]
                if header["member_id"] == status["Status"]["leader"]:
                    return member
        raise RuntimeError("no leader among running members")

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
