"""Fan-out: one etcd put delivered to 1, 16 and 64 client processes' ``apply``.

One daemon and etcd; for each size, the clients are ``LiveConfig`` objects spread over
at most ``PROCESSES`` processes (threads in a few processes: the machine has few
cores). Each process polls ``apply(step)`` on all of its clients in one loop and
records when each value is applied. A writer puts values at ``RATE`` per second;
latency is from just before each put to each client's apply, pooled over all clients.

Goal: p99 at 64 clients ≤ 20 ms.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.support import (
    Daemon,
    Etcd,
    Figure,
    Worker,
    at_most,
    latencies_ms,
    live_worker,
    percentile,
    start_workers,
    stop_all,
)
from benchmarks.writers import drive, reset_value

NAME = "fanout"
SIZES = (1, 16, 64)
PROCESSES = 4
RATE = 20.0
WARMUP = 3


def measure_size(
    etcd: Etcd, daemon: Daemon, workdir: Path, clients: int, count: int, first: int
) -> tuple[list[float], int]:
    """Pooled latencies (ms) of ``count`` puts to ``clients`` clients, and how many were due."""
    reset_value(etcd)
    procs = min(clients, PROCESSES)
    per_proc = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    timeout = count / RATE + 30
    workers: list[Worker] = [
        live_worker(workdir, daemon.socket_path, clients=n, timeout=timeout) for n in per_proc
    ]
    try:
        start_workers(workers)
        sent, results, _ = drive(etcd, workers, WARMUP + count, RATE, first=first)
    finally:
        stop_all(*workers)
    measured = dict(sorted(sent.items())[WARMUP:])
    lat: list[float] = []
    for result in results:
        for records in result["clients"]:
            lat += latencies_ms(measured, records)
    return lat, count * clients


def run(quick: bool) -> dict[str, Any]:
    count = 20 if quick else 100
    workdir = Path(tempfile.mkdtemp(prefix="hotknob-bench-"))
    etcd = daemon = None
    figures: list[Figure] = []
    try:
        etcd = Etcd().start()
        daemon = Daemon(workdir, endpoint=etcd.endpoint).start()
        for k, size in enumerate(SIZES):
            lat, due = measure_size(etcd, daemon, workdir, size, count, first=(k + 1) * 100_000)
            p99 = percentile(lat, 99)
            figures.append(Figure(f"{size} clients p50", percentile(lat, 50), "ms"))
            if size == SIZES[-1]:
                figures.append(at_most(f"{size} clients p99", p99, 20, "ms"))
            else:
                figures.append(Figure(f"{size} clients p99", p99, "ms"))
            figures.append(Figure(f"{size} clients applied", len(lat), f"of {due}"))
    finally:
        stop_all(etcd, daemon)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "figures": [f.as_dict() for f in figures],
        "params": {"puts": count, "rate_per_s": RATE, "processes": PROCESSES, "warmup": WARMUP},
    }
