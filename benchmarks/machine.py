"""A description of the machine a run was measured on, for ``results.json``.

Every figure is read against it: the benchmarks run on shared, noisy machines, so
the load at the start is recorded too. Nothing here imports torch or etcd's client.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _etcd_version() -> str | None:
    from hotknob.config import HotknobError
    from hotknob.daemon.local_etcd import find_etcd

    try:
        out = subprocess.run(
            [find_etcd(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (HotknobError, OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return out.strip() or None


def describe_machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "etcd": _etcd_version(),
        "etcd_sdk_python": _version("etcd-sdk-python"),
        "grpcio": _version("grpcio"),
        "hotknob": _version("hotknob"),
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
    }


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs since boot, from ``/proc/stat``; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)  # idle + iowait


def wait_until_quiet(
    idle: float = 0.8, window_s: float = 0.25, windows: int = 2, max_s: float = 10.0
) -> tuple[float, float | None]:
    """Wait until the CPUs were at least ``idle`` idle for ``windows`` windows in a row
    (what one benchmark left running, processes exiting, must not land on the next);
    at most ``max_s``. Returns the seconds waited and the idle fraction of the last window
    (None where ``/proc/stat`` is not there: no wait)."""
    started = time.monotonic()
    before = _cpu_times()
    if before is None:
        return 0.0, None
    quiet = 0
    fraction = 0.0
    while True:
        time.sleep(window_s)
        now = _cpu_times()
        assert now is not None
        total = now[1] - before[1]
        fraction = (now[0] - before[0]) / total if total > 0 else 1.0
        before = now
        quiet = quiet + 1 if fraction >= idle else 0
        waited = time.monotonic() - started
        if quiet >= windows or waited >= max_s:
            return round(waited, 2), round(fraction, 3)
