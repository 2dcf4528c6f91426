"""The writers of the benchmarks: etcd puts on a schedule, from one thread or several.

Send times are ``time.monotonic()``, taken just before each put (see ``support``); the
figures of a run hold for the rate its writers reached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.support import ETCD_KEY, STOP_VALUE, Etcd, Worker


def paced_puts(
    puts: Sequence[Callable[[int], None]], values: Sequence[int], rate: float
) -> dict[int, float]:
    """Send ``values`` at ``rate`` per second, value ``i`` due at ``start + i / rate``.

    Returns each value's send time (taken just before its put). With several ``puts``
    (each its own client), value ``i`` goes through ``puts[i % len(puts)]`` on a thread
    of its own, so one put that blocks does not hold back the others. A writer behind
    the schedule puts at once until it has caught up; what the writers reached shows in
    the send times.
    """
    sent: dict[int, float] = {}
    failed: list[BaseException] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.05

    def run(indices: range, do_put: Callable[[int], None]) -> None:
        try:
            for i in indices:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                t = time.monotonic()
                do_put(values[i])
                with lock:
                    sent[values[i]] = t
        except BaseException as exc:  # a writer that stopped: the run is no run at that rate
            failed.append(exc)

    if len(puts) == 1:
        run(range(len(values)), puts[0])
    else:
        pool = [
            threading.Thread(
                target=run, args=(range(k, len(values), len(puts)), put), name=f"bench-writer-{k}"
            )
            for k, put in enumerate(puts)
        ]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    if failed:
        raise RuntimeError(f"a writer failed after {len(sent)} of {len(values)} puts") from failed[
            0
        ]
    return sent


def etcd_put(
    client: Any, keys: Sequence[str] = (ETCD_KEY,), first: int = 1
) -> Callable[[int], None]:
    """A put of ``value`` to ``keys[(value - first) % len(keys)]``: with several keys, the
    values take them in turn."""

    def put(value: int) -> None:
        client.put(keys[(value - first) % len(keys)], str(value))

    return put


def drive(
    etcd: Etcd,
    workers: Sequence[Worker],
    count: int,
    rate: float,
    *,
    threads: int = 1,
    first: int = 1,
    settle_s: float = 0.05,
    timeout: float = 60.0,
    keys: Sequence[str] = (ETCD_KEY,),
) -> tuple[dict[int, float], list[dict[str, Any]], float]:
    """Put ``count`` values (``first``, ``first + 1``, ...) at ``rate``, then, ``settle_s``
    later, ``STOP_VALUE``; ``threads`` writers (each its own client) share the puts
    (``paced_puts``). With several ``keys`` the values take them in turn
    (``etcd_put``) and each key gets ``STOP_VALUE``.

    Returns the send times, each worker's records, and the send time of the last value.
    """
    values = list(range(first, first + count))
    clients = [etcd.client() for _ in range(threads)]
    try:
        puts = [etcd_put(c, keys, first) for c in clients]
        sent = paced_puts(puts, values, rate)
        last_sent = max(sent.values())
        time.sleep(settle_s)
        for key in keys:
            clients[0].put(key, str(STOP_VALUE))
    finally:
        for c in clients:
            c.close()
    results = [w.result(timeout) for w in workers]
    return sent, results, last_sent


def reset_value(etcd: Etcd, value: int = 0) -> None:
    """Put ``value`` (so that a later ``STOP_VALUE`` is a change again) before a round."""
    client = etcd.client()
    try:
        client.put(ETCD_KEY, str(value))
    finally:
        client.close()
    time.sleep(0.1)
