"""etcd put → applied in a client process, against a bare etcd watch in the same run.

One etcd, one ``hotknob run`` watching it, and three readers in child processes: a
``LiveConfig`` that spins ``apply(step)`` (a ``POLL_S`` sleep between calls) and records
when each value is applied; a bare etcd-sdk-python prefix watch that records when its
callback sees each value (the baseline: what any Python process watching etcd itself
would get); and the floor (below). Latencies run from the moment just before a put to
the moment it is seen, on the same clock. The first ``WARMUP`` values of each reader
are left out (connections and caches warming up).

**Each put wakes one reader.** Each reader watches a prefix of its own (hotknob the
daemon's, the baseline ``BASELINE_PREFIX``, the floor ``FLOOR_PREFIX``) and one writer
puts to the three in turn, each reader getting ``RATE`` puts a second: every reading
has the same machine at the same time (all processes up, both polling clients
spinning), and none waits for the CPU behind another reader's work on the same put.
With the three readers on the same puts (up to the twelfth round), the two cores ran
up to seven processes' work at every put: the baseline's watch took ~1.9 ms instead of
~1.0 (it queued behind the daemon's and the floor's work) and most of hotknob's own
work was hidden in that queue (docs/performance-history.md, twelfth round).

Goal: hotknob's p50 ≤ 1.4 x and p99 ≤ 1.3 x the baseline's (confd, rendering a file,
measured 1.4 x / 1.3 x on this kind of machine).

A third reading, in the same run, is the floor of the architecture (``relay`` in
``benchmarks.worker``): the same watch handing each value through an asyncio loop
and a Unix socket to a reader thread in another process, polled like the
``LiveConfig`` — the hops of a sidecar with an event loop, none of hotknob's work
(hotknob itself skips the hop to its loop for a change that comes alone).
hotknob - floor is what the daemon's and the runtime's own work adds, less that hop;
floor / baseline is what such a sidecar costs whatever its work is.

Beside each ratio with a goal, its bootstrap 95 % interval (both readers' values drawn
again with replacement, 1,000 times): a run's p99 rests on its 15 slowest values, and
in the twenty-second round the ratio moved by up to 0.28 between windows of one run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.support import (
    ETCD_KEY,
    Daemon,
    Etcd,
    Figure,
    Worker,
    at_most,
    latencies_ms,
    live_worker,
    percentile,
    ratio_interval,
    relay_workers,
    start_workers,
    stop_all,
    watch_worker,
)
from benchmarks.writers import drive

NAME = "etcd_latency"
# Values per reader in a full run. The p99 is the 15th slowest of them: over 500 (the
# fifth slowest) the p99 ratio of one run moved by up to 0.28 between consecutive
# windows of the same run (docs/performance-history.md, twenty-second round).
COUNT = 1500
WARMUP = 10
RATE = 50.0
POLL_S = 5e-5
BASELINE_PREFIX = "/bench/baseline/"
FLOOR_PREFIX = "/bench/floor/"


def measure(count: int, rate: float = RATE) -> dict[str, list[float]]:
    """Latencies in ms (after the warm-up) of the LiveConfig, the baseline and the floor."""
    workdir = Path(tempfile.mkdtemp(prefix="hotknob-bench-"))
    etcd = daemon = None
    workers: list[Worker] = []
    try:
        etcd = Etcd().start()
        daemon = Daemon(workdir, endpoint=etcd.endpoint).start()
        timeout = count / rate + 30
        relay_server, relay = relay_workers(
            workdir, etcd.endpoint, timeout=timeout, prefix=FLOOR_PREFIX
        )
        workers = [relay_server]
        start_workers(workers)
        readers = [
            live_worker(workdir, daemon.socket_path, timeout=timeout, poll_s=POLL_S),
            watch_worker(workdir, etcd.endpoint, timeout=timeout, prefix=BASELINE_PREFIX),
            relay,
        ]
        workers += readers
        start_workers(readers)
        keys = (ETCD_KEY, BASELINE_PREFIX + "value", FLOOR_PREFIX + "value")
        # Value v goes to keys[(v - 1) % 3]: the readers take the puts in turn.
        sent, results, _ = drive(
            etcd,
            [*readers, relay_server],
            len(keys) * (WARMUP + count),
            len(keys) * rate,
            keys=keys,
        )
        measured = {v: t for v, t in sent.items() if v > len(keys) * WARMUP}
        live, base, floor = (latencies_ms(measured, r["clients"][0]) for r in results[:3])
        return {"hotknob": live, "baseline": base, "floor": floor}
    finally:
        stop_all(etcd, daemon, *workers)
        shutil.rmtree(workdir, ignore_errors=True)


def figures(
    hotknob: list[float], baseline: list[float], floor: list[float], sent: int
) -> list[Figure]:
    h50, h99 = percentile(hotknob, 50), percentile(hotknob, 99)
    b50, b99 = percentile(baseline, 50), percentile(baseline, 99)
    f50, f99 = percentile(floor, 50), percentile(floor, 99)
    return [
        Figure("baseline watch p50", b50, "ms"),
        Figure("baseline watch p99", b99, "ms"),
        Figure("architecture floor p50", f50, "ms"),
        Figure("architecture floor p99", f99, "ms"),
        Figure("hotknob applied p50", h50, "ms"),
        Figure("hotknob applied p99", h99, "ms"),
        at_most("p50 / baseline p50", h50 / b50, 1.4, "x", "<= 1.4x"),
        at_most("p99 / baseline p99", h99 / b99, 1.3, "x", "<= 1.3x"),
        *interval_figures(hotknob, baseline, 50),
        *interval_figures(hotknob, baseline, 99),
        Figure("floor p50 / baseline p50", f50 / b50, "x"),
        Figure("floor p99 / baseline p99", f99 / b99, "x"),
        Figure("hotknob p50 - floor p50 (its own work)", h50 - f50, "ms"),
        Figure("values applied", len(hotknob), f"of {sent}"),
    ]


def interval_figures(hotknob: list[float], baseline: list[float], q: int) -> list[Figure]:
    """The bootstrap 95 % interval of the p``q`` ratio (``ratio_interval``): how far this
    run's ratio could have fallen had the same machine drawn other values."""
    low, high = ratio_interval(hotknob, baseline, q)
    name = f"p{q} / baseline p{q}, 95 % interval"
    return [Figure(f"{name}, low", low, "x"), Figure(f"{name}, high", high, "x")]


def run(quick: bool) -> dict[str, Any]:
    count = 100 if quick else COUNT
    lat = measure(count)
    return {
        "figures": [
            f.as_dict() for f in figures(lat["hotknob"], lat["baseline"], lat["floor"], count)
        ],
        "params": {
            "puts_per_reader": count,
            "rate_per_s_per_reader": RATE,
            "warmup": WARMUP,
            "poll_s": POLL_S,
            "readers_take_turns": True,
        },
    }
