"""Config file save (write-then-rename) → applied in a client process.

``hotknob run --config FILE`` (no etcd) and a ``LiveConfig`` process spinning
``apply(step)``. Every ``INTERVAL_S`` the writer saves the file the way editors and
config tools do: write a temp file in the same folder, then rename it over the config.
Latency runs from just before the temp file is written to the moment ``apply`` returns
the new value. The daemon's file watcher waits for a quiet moment (its debounce) after
the last filesystem event before reading the file, except after a rename onto the
config's name (an atomic save has finished), where it waits only a short settle time;
both values in force are reported beside the figure.

Goal: p50 ≤ 50 ms.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.support import (
    STOP_VALUE,
    Daemon,
    Figure,
    Worker,
    at_most,
    latencies_ms,
    live_worker,
    percentile,
    start_workers,
    stop_all,
)

NAME = "file_latency"
INTERVAL_S = 0.2
WARMUP = 2


def _watcher_default(name: str) -> float | None:
    """A default of the daemon's file watcher (``debounce_s``, ``settle_s``), if it has one."""
    import inspect

    from hotknob.daemon.file_watcher import FileLayerWatcher

    param = inspect.signature(FileLayerWatcher).parameters.get(name)
    return None if param is None else float(param.default)


def save(path: Path, value: int) -> None:
    """Write-then-rename, as an editor's atomic save does."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"train:\n  warmup_steps: {value}\n")
    os.replace(tmp, path)


def measure(count: int) -> list[float]:
    workdir = Path(tempfile.mkdtemp(prefix="hotknob-bench-"))
    config = workdir / "conf" / "config.yaml"
    config.parent.mkdir()
    save(config, 0)
    daemon = None
    workers: list[Worker] = []
    try:
        daemon = Daemon(workdir, configs=[config]).start()
        workers = [live_worker(workdir, daemon.socket_path, timeout=count * INTERVAL_S + 30)]
        start_workers(workers)
        sent: dict[int, float] = {}
        start = time.monotonic()
        for i, value in enumerate(range(1, WARMUP + count + 1)):
            delay = start + i * INTERVAL_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent[value] = time.monotonic()
            save(config, value)
        time.sleep(INTERVAL_S)
        save(config, STOP_VALUE)
        records = workers[0].result()["clients"][0]
        measured = {v: t for v, t in sent.items() if v > WARMUP}
        return latencies_ms(measured, records)
    finally:
        stop_all(daemon, *workers)
        shutil.rmtree(workdir, ignore_errors=True)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def run(quick: bool) -> dict[str, Any]:
    count = 15 if quick else 50
    lat = measure(count)
    return {
        "figures": [
            f.as_dict()
            for f in (
                at_most("save -> applied p50", percentile(lat, 50), 50, "ms"),
                Figure("save -> applied p99", percentile(lat, 99), "ms"),
                Figure("watcher debounce", _ms(_watcher_default("debounce_s")), "ms"),
                Figure("watcher settle after a rename", _ms(_watcher_default("settle_s")), "ms"),
                Figure("saves applied", len(lat), f"of {count}"),
            )
        ],
        "params": {"saves": count, "interval_s": INTERVAL_S, "warmup": WARMUP},
    }
