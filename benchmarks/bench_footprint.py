"""Footprint: daemon memory, time to a ready socket, and the runtime's import time.

- ready: from spawning ``hotknob run`` (with etcd) to the first moment its socket
  answers a ``hello`` with a snapshot (polled every 2 ms), median of a few starts;
  goal ≤ 1.5 s. This includes the interpreter's own start and every import.
- idle RSS: ``VmRSS`` of the ready daemon after ``IDLE_S`` with nothing happening;
  goal ≤ 75 MB (the RSS after a burst is in the burst figures).
- import: ``import hotknob.model_runtime`` as a training process does it (``from
  hotknob.model_runtime import LiveConfig``: the package itself loads its modules on
  first use) timed inside a fresh interpreter, median of several; goal ≤ 50 ms.
  Whether that import pulled in torch is reported beside it. hotknob's own modules are
  byte-compiled first, as installing the package does: a checkout run where Python writes
  no bytecode (``PYTHONDONTWRITEBYTECODE``) would otherwise time compiling every module
  from source at every start (72 against 34 ms here in the thirty-sixth round), which
  no installed process pays.
"""

from __future__ import annotations

import compileall
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.support import Daemon, Etcd, Figure, at_most, stop_all

NAME = "footprint"
IDLE_S = 1.0

_IMPORT_PROBE = (
    "import json, sys, time; t = time.perf_counter(); "
    "from hotknob.model_runtime import LiveConfig; "
    "d = time.perf_counter() - t; "
    "print(json.dumps({'s': d, 'torch': 'torch' in sys.modules, "
    "'grpc': 'grpc' in sys.modules}))"
)


PACKAGES = ("hotknob.config", "hotknob.daemon", "hotknob.model_runtime")


def byte_compile() -> None:
    """Write the bytecode of hotknob's own packages where Python looks for it, as
    installing the package does (``compileall`` writes it whatever
    ``PYTHONDONTWRITEBYTECODE`` says; a module that does not compile fails the import
    that follows, loudly)."""
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(folder, quiet=1)


def import_time(runs: int) -> tuple[float, bool, bool]:
    """Median seconds of importing ``LiveConfig``; whether torch / grpc came along."""
    times, torch, grpc = [], False, False
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True
        ).stdout
        probe = json.loads(out)
        times.append(probe["s"])
        torch |= probe["torch"]
        grpc |= probe["grpc"]
    return statistics.median(times), torch, grpc


def daemon_starts(runs: int) -> tuple[list[float], float]:
    """Ready times (s) of ``runs`` daemon starts against one etcd, and the idle RSS (MB)."""
    workdir = Path(tempfile.mkdtemp(prefix="hotknob-bench-"))
    etcd = None
    ready: list[float] = []
    rss = float("nan")
    try:
        etcd = Etcd().start()
        for i in range(runs):
            daemon = Daemon(workdir / f"run{i}", endpoint=etcd.endpoint)
            try:
                daemon.start()
                ready.append(daemon.ready_s)
                if i == 0:
                    time.sleep(IDLE_S)
                    rss = daemon.rss_mb()
            finally:
                daemon.stop()
    finally:
        stop_all(etcd)
        shutil.rmtree(workdir, ignore_errors=True)
    return ready, rss


def run(quick: bool) -> dict[str, Any]:
    byte_compile()
    ready, rss = daemon_starts(2 if quick else 5)
    imp, torch, grpc = import_time(3 if quick else 9)
    figures = [
        at_most("hotknob run -> socket ready (median)", statistics.median(ready), 1.5, "s"),
        Figure("hotknob run -> socket ready (max)", max(ready), "s"),
        at_most("daemon RSS idle", rss, 75, "MB"),
        at_most("import hotknob.model_runtime", imp * 1000, 50, "ms"),
        Figure("that import loads torch", float(torch), "bool", "0", not torch),
        Figure("that import loads grpc", float(grpc), "bool", "0", not grpc),
    ]
    return {
        "figures": [f.as_dict() for f in figures],
        "params": {"daemon_starts": len(ready), "idle_s": IDLE_S},
    }
