"""Child processes of the benchmarks: ``python -m benchmarks.worker ROLE --out FILE ...``.

Roles:

- ``live``: ``--clients N`` LiveConfigs on the daemon's socket; one loop calls
  ``apply(step)`` on each, then sleeps ``--poll`` seconds, and records
  ``(value, time.monotonic())`` whenever ``apply`` returns True. This is what a
  training loop sees: the time a value is *applied*, not merely received.
- ``watch``: a bare etcd-sdk-python prefix watch (the baseline), recording
  ``(value, time.monotonic())`` in the watch callback.

Each prints ``ready`` once it is connected, stops when every client has seen
``STOP_VALUE`` (or after ``--timeout`` seconds), and writes its records to ``--out``
as JSON: ``{"clients": [[[value, time], ...], ...], "pid": PID}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

from benchmarks.support import CONFIG_PREFIX, KEY, STOP_VALUE


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def run_live(args: argparse.Namespace) -> dict[str, Any]:
    from hotknob.model_runtime import LiveConfig

    lives = [
        LiveConfig.connect(args.socket, timeout=20, client=f"bench-{i}")
        for i in range(args.clients)
    ]
    records: list[list[tuple[int, float]]] = [[] for _ in lives]
    waiting = set(range(len(lives)))
    _ready()
    deadline = time.monotonic() + args.timeout
    poll = args.poll
    step = 0
    try:
        while waiting and time.monotonic() < deadline:
            step += 1
            for i, live in enumerate(lives):
                if live.apply(step):
                    t = time.monotonic()
                    value = live[KEY]
                    records[i].append((value, t))
                    if value == STOP_VALUE:
                        waiting.discard(i)
            time.sleep(poll)
    finally:
        for live in lives:
            live.close()
    return {"clients": records}


def run_watch(args: argparse.Namespace) -> dict[str, Any]:
    import pyetcd

    host, port = args.endpoint.rsplit(":", 1)
    client = pyetcd.client(host=host, port=int(port), timeout=10)
    records: list[tuple[int, float]] = []
    done = threading.Event()

    def on_response(response: Any) -> None:
        t = time.monotonic()
        if isinstance(response, BaseException) or response is None:
            done.set()
            return
        for event in response.events:
            value = int(event.value)
            records.append((value, t))
            if value == STOP_VALUE:
                done.set()

    watch_id = client.add_watch_prefix_callback(CONFIG_PREFIX, on_response)
    _ready()
    try:
        done.wait(args.timeout)
    finally:
        client.cancel_watch(watch_id)
        client.close()
    return {"clients": [records]}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("role", choices=["live", "watch"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--socket")
    parser.add_argument("--endpoint")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--poll", type=float, default=5e-5)
    args = parser.parse_args()
    result = run_live(args) if args.role == "live" else run_watch(args)
    result["pid"] = os.getpid()
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
