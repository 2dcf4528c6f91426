"""``live.report(step, loss=...)``: the cost paid on every training step that reports.

Timed with ``timeit`` as a training loop calls it (attribute lookup and call
included), best of several repeats. Three figures:

* ``live.report(step, loss=x)`` on a ``LiveConfig`` connected to a real daemon
  (no etcd), its sending thread running and sending every second meanwhile;
* the reporter alone (``MetricsReporter.report``) with one and with four metrics;
* the sending side's cost per message (taking 32 values of four metrics, building
  the message), which runs on the background thread, once per ``report_every_s``.

Goal: ≤ 1 µs per ``report`` call between sends.
"""

from __future__ import annotations

import shutil
import tempfile
import timeit
from pathlib import Path
from typing import Any

from benchmarks.support import Daemon, Figure, at_most, stop_all

NAME = "reporting"


def _best_ns(stmt: str, env: dict[str, Any], number: int, repeat: int) -> float:
    timer = timeit.Timer(stmt, globals=env)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def live_report_ns(number: int, repeat: int) -> float:
    """Best ns per ``live.report(step, loss=x)`` on a client connected to a real daemon."""
    from hotknob.model_runtime import LiveConfig

    workdir = Path(tempfile.mkdtemp(prefix="hotknob-bench-"))
    daemon = None
    try:
        daemon = Daemon(workdir).start()
        with LiveConfig.connect(daemon.socket_path, timeout=20, client="bench-report") as live:
            env = {"live": live, "step": 1, "x": 0.5}
            return _best_ns("live.report(step, loss=x)", env, number, repeat)
    finally:
        stop_all(daemon)
        shutil.rmtree(workdir, ignore_errors=True)


def reporter_ns(number: int, repeat: int) -> tuple[float, float, float]:
    """ns per ``report`` with 1 and 4 metrics, and ns per message taken (4 metrics of 32 values)."""
    from hotknob.model_runtime.reporting import MetricsReporter

    reporter = MetricsReporter(lambda message: None)
    try:
        env = {"r": reporter, "step": 1, "x": 0.5}
        one = _best_ns("r.report(step, loss=x)", env, number, repeat)
        four = _best_ns("r.report(step, loss=x, grad_norm=x, lr=x, tok_s=x)", env, number, repeat)
        fill = "for i in range(32): r.report(i, loss=x, grad_norm=x, lr=x, tok_s=x)"
        setup = timeit.Timer(fill, globals=env)
        take = timeit.Timer("r.take()", globals=env)
        samples = []
        for _ in range(200):
            setup.timeit(1)
            samples.append(take.timeit(1) * 1e9)
        return one, four, min(samples)
    finally:
        reporter.stop()


def run(quick: bool) -> dict[str, Any]:
    number = 50_000 if quick else 1_000_000
    live = live_report_ns(number, repeat=5)
    one, four, take = reporter_ns(number, repeat=5)
    return {
        "figures": [
            f.as_dict()
            for f in (
                at_most("live.report(step, loss=x), between sends", live, 1000, "ns"),
                at_most("reporter alone, 1 metric", one, 1000, "ns"),
                at_most("reporter alone, 4 metrics", four, 1000, "ns"),
                Figure("building one message (4 metrics x 32 values), sender thread", take, "ns"),
            )
        ],
        "params": {"number": number, "repeat": 5, "window": 32},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))
