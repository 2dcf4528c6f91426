"""Burst: 2,000 etcd puts per second for 5 s, delivered to one client process.

One daemon and etcd, one ``LiveConfig`` process calling ``apply(step)`` every
``POLL_S`` (a step of 1 ms: faster than any training or serving loop calls it).
``WRITERS`` writer threads (each its own etcd client) share the puts so that one slow
put does not hold back the schedule. The client is expected to coalesce (it sees the
newest value at each apply, not every value); what matters is that the daemon keeps up:

- the last value of the burst is applied ≤ 100 ms after it was put;
- the delivery lag does not grow through the burst: "lag growth" is the median lag of
  the values applied in the last fifth of the burst minus that of the first fifth
  (a queue that grows shows up as a lag that climbs); goal ≤ 10 ms;
- the daemon's RSS (``VmRSS``) grows ≤ 10 MB from idle (one client connected) to
  just after the burst, and stays ≤ 75 MB.

The writers share two cores with etcd, the daemon and the client (over a burst: etcd
~0.55 of a core, the writers ~0.5, the daemon ~0.5, the client ~0.06 at a 1 ms step).
They run at the same priority as the rest, and the rate they reach is a goal of its own
(``MIN_RATE``, 95 % of the target, counted from the first put to the last). Writers
that yielded the CPU (at nice 10, as they did before) fell behind whenever anything
else on the machine wanted it: 1,505-1,821 puts/s in three runs of three beside a
process taking 0.4 of a core, where writers at nice 0 reached 1,983-2,000/s and the
daemon still kept up (lag growth under 1 ms). Not 100 %: a put slow at the end takes
tens of ms off the rate.

A second round on the same etcd gives the same burst to a bare etcd-sdk-python watch
alone (the daemon and its client stopped, so that they do not share the machine): the
figures of that round say what the machine and the client library can do, as the
baseline of the latency benchmark does.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.support import (
    ETCD_KEY,
    Daemon,
    Etcd,
    Figure,
    Worker,
    at_least,
    at_most,
    latencies_ms,
    live_worker,
    percentile,
    start_workers,
    stop_all,
    watch_worker,
)
from benchmarks.writers import drive, reset_value

NAME = "burst"
RATE = 2000.0
MIN_RATE = 0.95 * RATE
WRITERS = 4
POLL_S = 1e-3


def _lag_growth_ms(sent: dict[int, float], records: list[tuple[int, float]]) -> float:
    start, end = min(sent.values()), max(sent.values())
    span = end - start
    lags = [(sent[v], (t - sent[v]) * 1000) for v, t in records if v in sent]
    first = [lag for ts, lag in lags if ts <= start + span / 5]
    last = [lag for ts, lag in lags if ts >= end - span / 5]
    if not first or not last:
        return float("nan")
    return statistics.median(last) - statistics.median(first)


def _last_value(etcd: Etcd) -> int:
    """With several writers the value put last by the schedule need not be the one etcd
    ordered last: the burst's last value is what etcd held just before the stop value."""
    client = etcd.client()
    try:
        _, stop = client.get(ETCD_KEY)
        held, _ = client.get(ETCD_KEY, revision=stop.mod_revision - 1)
    finally:
        client.close()
    return int(held)


def _last_ms(sent: dict[int, float], records: list[tuple[int, float]], last: int) -> float:
    seen = [t for v, t in records if v == last]
    return (seen[0] - sent[last]) * 1000 if seen else float("nan")


def run(quick: bool) -> dict[str, Any]:
    seconds = 1.0 if quick else 5.0
    # The stop value waits this long after the last put, so that the last put is applied
    # (and timed) before it: well above the goal's 100 ms, shorter in a quick run.
    settle = 0.3 if quick else 1.0
    count = int(RATE * seconds)
    workdir = Path(tempfile.mkdtemp(prefix="hotknob-bench-"))
    etcd = daemon = None
    workers: list[Worker] = []
    try:
        etcd = Etcd().start()
        daemon = Daemon(workdir, endpoint=etcd.endpoint).start()
        workers = [live_worker(workdir, daemon.socket_path, timeout=seconds + 30, poll_s=POLL_S)]
        start_workers(workers)
        time.sleep(0.5)
        rss_idle = daemon.rss_mb()
        sent, results, _ = drive(etcd, workers, count, RATE, threads=WRITERS, settle_s=settle)
        rss_after = daemon.rss_mb()
        last = _last_value(etcd)
        stop_all(daemon, *workers)
        daemon, workers = None, []
        # The baseline round: the same burst, a bare watch alone on the machine.
        reset_value(etcd)
        workers = [watch_worker(workdir, etcd.endpoint, timeout=seconds + 30)]
        start_workers(workers)
        base_sent, base_results, _ = drive(
            etcd,
            workers,
            count,
            RATE,
            threads=WRITERS,
            settle_s=settle,
            first=count + 1,
        )
        base_last = _last_value(etcd)
    finally:
        stop_all(etcd, daemon, *workers)
        shutil.rmtree(workdir, ignore_errors=True)
    records = [(v, t) for v, t in results[0]["clients"][0]]
    base_records = [(v, t) for v, t in base_results[0]["clients"][0]]
    span = max(sent.values()) - min(sent.values())
    lags = latencies_ms(sent, records)
    figures = [
        at_least(
            "puts per second reached", (len(sent) - 1) / span if span > 0 else None, MIN_RATE, "1/s"
        ),
        at_most("last put -> applied", _last_ms(sent, records, last), 100, "ms"),
        at_most("lag growth through the burst", _lag_growth_ms(sent, records), 10, "ms"),
        Figure("put -> applied p50, values applied", percentile(lags, 50), "ms"),
        Figure("put -> applied p99, values applied", percentile(lags, 99), "ms"),
        Figure("daemon RSS idle (1 client)", rss_idle, "MB"),
        at_most("daemon RSS after the burst", rss_after, 75, "MB"),
        at_most("daemon RSS growth", rss_after - rss_idle, 10, "MB"),
        Figure("values applied (coalesced)", len(records) - 1, f"of {count}"),
        Figure(
            "baseline watch alone: last put -> seen",
            _last_ms(base_sent, base_records, base_last),
            "ms",
        ),
        Figure("baseline watch alone: lag growth", _lag_growth_ms(base_sent, base_records), "ms"),
        Figure(
            "baseline watch alone: put -> seen p99",
            percentile(latencies_ms(base_sent, base_records), 99),
            "ms",
        ),
    ]
    return {
        "figures": [f.as_dict() for f in figures],
        "params": {
            "rate_per_s": RATE,
            "seconds": seconds,
            "puts": count,
            "writers": WRITERS,
            "client_poll_s": POLL_S,
        },
    }
