"""What every benchmark shares: a real etcd and ``hotknob run``, child workers, figures.

Everything here starts real processes and owns them: each ``start`` has a ``stop`` that
is safe to call twice, and the context managers stop in reverse start order, so a
benchmark that fails half-way leaves nothing running.

Times across processes are ``time.monotonic()`` (``CLOCK_MONOTONIC``), which on Linux is
one clock for the whole machine: a writer's send time and a reader's receive time in
another process can be subtracted.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APP = "bench"
CONFIG_PREFIX = f"/hotknob/{APP}/config/"
# An int field, live, with no upper bound: the writers count up through it.
KEY = "train.warmup_steps"
ETCD_KEY = CONFIG_PREFIX + "train/warmup_steps"
STOP_VALUE = 999_999_999


@dataclass
class Figure:
    """One measured number. ``ok`` is None when the figure has no goal (it is context)."""

    name: str
    value: float | None
    unit: str
    goal: str = ""
    ok: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        value = None if self.value is None or math.isnan(self.value) else round(self.value, 4)
        return {
            "name": self.name,
            "value": value,
            "unit": self.unit,
            "goal": self.goal,
            "ok": self.ok,
        }


def at_most(name: str, value: float | None, limit: float, unit: str, goal: str = "") -> Figure:
    """A figure whose goal is ``value <= limit``; a missing value is a miss."""
    ok = value is not None and not math.isnan(value) and value <= limit
    return Figure(name, value, unit, goal or f"<= {limit:g} {unit}", ok)


def at_least(name: str, value: float | None, limit: float, unit: str) -> Figure:
    """A figure whose goal is ``value >= limit``; a missing value is a miss."""
    ok = value is not None and not math.isnan(value) and value >= limit
    return Figure(name, value, unit, f">= {limit:g} {unit}", ok)


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ratio_interval(
    numerator: Sequence[float],
    denominator: Sequence[float],
    q: float,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """A bootstrap interval (``level``, percentile method) of ``percentile(numerator, q) /
    percentile(denominator, q)``: each sample drawn again with replacement, ``resamples``
    times, the same draws for the same ``seed``. NaNs for an empty sample. How far one
    run's ratio could have fallen on the same machine, not a promise for another run."""
    if not numerator or not denominator:
        return math.nan, math.nan
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        top = percentile(rng.choices(numerator, k=len(numerator)), q)
        bottom = percentile(rng.choices(denominator, k=len(denominator)), q)
        ratios.append(top / bottom if bottom else math.inf)
    tail = (1.0 - level) / 2 * 100.0
    return percentile(ratios, tail), percentile(ratios, 100.0 - tail)


def latencies_ms(sent: dict[int, float], received: Iterable[tuple[int, float]]) -> list[float]:
    """Receive time minus send time, in ms, for every value that was both sent and received."""
    return [(t - sent[v]) * 1000.0 for v, t in received if v in sent]


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` from ``/proc/PID/status`` (VmRSS), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scratch_dir(prefix: str) -> Path:
    """A fresh folder on tmpfs when there is one, so etcd's fsyncs measure nothing of the disk."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def _stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 8.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Etcd:
    """A single-member etcd on free loopback ports, its data on tmpfs (see ``scratch_dir``)."""

    def __init__(self) -> None:
        from hotknob.daemon.local_etcd import LocalEtcd

        self.dir = scratch_dir("hotknob-bench-etcd-")
        self._etcd = LocalEtcd(self.dir / "data")

    @property
    def endpoint(self) -> str:
        return self._etcd.endpoint

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.endpoint.rsplit(":", 1)
        return host, int(port)

    def start(self) -> Etcd:
        self._etcd.start()
        return self

    def client(self) -> Any:
        import pyetcd

        host, port = self.host_port
        return pyetcd.client(host=host, port=port, timeout=10)

    def stop(self) -> None:
        self._etcd.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Etcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Daemon:
    """``hotknob run`` in a child process, with its socket, state and log under ``workdir``.

    ``start`` returns once the socket answers ``hello`` with a snapshot, and records how
    long that took from the spawn (``ready_s``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        endpoint: str | None = None,
        configs: Sequence[Path] = (),
        extra: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.socket_path = workdir / "sock" / f"{APP}.sock"
        self.log_path = workdir / "daemon.log"
        args = ["run", "--app", APP, "--socket", str(self.socket_path)]
        args += ["--state-dir", str(workdir / "state")]
        if endpoint:
            args += ["--etcd-endpoints", endpoint]
        for path in configs:
            args += ["--config", str(path)]
        self.args = [*args, *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = math.nan

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> Daemon:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTKNOB_")}
        with open(self.log_path, "ab") as log:
            started = time.monotonic()
            self.proc = subprocess.Popen(
                python_cmd("-m", "hotknob.daemon.cli", *self.args),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
            if _snapshot_answered(self.socket_path):
                self.ready_s = time.monotonic() - started
                return self
            time.sleep(0.002)
        self.stop()
        raise RuntimeError(f"the daemon was not ready within {timeout} s:\n{self.log()}")

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        _stop_process(self.proc)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _snapshot_answered(path: Path) -> bool:
    """True if a client can connect to ``path``, say hello and read a snapshot line."""
    from hotknob.model_runtime import protocol

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(str(path))
        sock.sendall(protocol.encode(protocol.hello("bench-probe")))
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            data += chunk
        return bool(protocol.decode(data.split(b"\n", 1)[0])["type"] == protocol.SNAPSHOT)
    except OSError:
        return False
    finally:
        sock.close()


@dataclass
class Worker:
    """A ``python -m benchmarks.worker ROLE ...`` child: ``start`` waits for its "ready" line,
    ``result`` waits for it to finish and returns the JSON it wrote."""

    role: str
    args: list[str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix=f"worker-{self.role}-", suffix=".json", dir=self.workdir)
        os.close(fd)
        self.out = Path(name)

    def start(self) -> Worker:
        self.proc = subprocess.Popen(
            python_cmd("-m", "benchmarks.worker", self.role, "--out", str(self.out), *self.args),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("HOTKNOB_")},
        )
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"worker {self.role} not ready (exit {self.proc.poll()})")

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"worker {self.role} did not finish within {timeout} s") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"worker {self.role} exited with {self.proc.returncode}")
        data: dict[str, Any] = json.loads(self.out.read_text())
        return data

    def stop(self) -> None:
        _stop_process(self.proc, timeout=3.0)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def start_workers(workers: Sequence[Worker]) -> None:
    """Start all at once (their imports overlap), then wait until every one is ready."""
    for w in workers:
        w.start()
    for w in workers:
        w.wait_ready()


def live_worker(
    workdir: Path, socket_path: Path, *, clients: int = 1, timeout: float, poll_s: float = 5e-5
) -> Worker:
    """A process with ``clients`` LiveConfigs, recording when ``apply`` returns each value."""
    args = [
        "--socket",
        str(socket_path),
        "--clients",
        str(clients),
        "--timeout",
        str(timeout),
        "--poll",
        str(poll_s),
    ]
    return Worker("live", args, workdir)


def watch_worker(
    workdir: Path, endpoint: str, *, timeout: float, prefix: str = CONFIG_PREFIX
) -> Worker:
    """A process with a bare etcd-sdk-python watch on ``prefix``: the same-run baseline."""
    args = ["--endpoint", endpoint, "--timeout", str(timeout), "--prefix", prefix]
    return Worker("watch", args, workdir)


def relay_workers(
    workdir: Path, endpoint: str, *, timeout: float, prefix: str = CONFIG_PREFIX
) -> list[Worker]:
    """The architecture floor (see ``benchmarks.worker``), watching ``prefix``: its server,
    then its client. Start the server first: the client connects to the server's socket."""
    path = str(workdir / "relay.sock")
    server = Worker(
        "relay-server",
        ["--endpoint", endpoint, "--socket", path, "--timeout", str(timeout), "--prefix", prefix],
        workdir,
    )
    client = Worker("relay", ["--socket", path, "--timeout", str(timeout)], workdir)
    return [server, client]


def stop_all(*things: Any) -> None:
    """Stop each (a Worker, Daemon, Etcd, or None), last first, never raising on the way."""
    for thing in reversed(things):
        if thing is None:
            continue
        try:
            thing.stop()
        except Exception as exc:
            print(f"benchmarks: stopping {type(thing).__name__} failed: {exc}", file=sys.stderr)
