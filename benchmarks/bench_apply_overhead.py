"""``live.apply(step)`` with nothing pending: the cost paid on every training step.

A ``LiveConfig`` connected to a real daemon (no etcd, nothing changing) is timed with
``timeit`` as a training loop calls it, ``live.apply(step)`` (attribute lookup and
call included); the best of several repeats is kept, as ``timeit`` advises, since
noise only ever adds time. The same figure is put against a small real training step:
an MLP (``IN`` → ``HIDDEN`` → ``HIDDEN`` → ``OUT``, batch ``BATCH``) on the CPU with
forward, backward and an SGD step, median over many steps.

Goals: ≤ 200 ns per call; ≤ 1 % of the step.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from benchmarks.support import Daemon, Figure, at_most, stop_all

NAME = "apply_overhead"
IN, HIDDEN, OUT, BATCH = 128, 256, 10, 64


def apply_ns(number: int, repeat: int) -> float:
    """Best time per ``live.apply(step)`` call with nothing pending, in ns."""
    from hotknob.model_runtime import LiveConfig

    workdir = Path(tempfile.mkdtemp(prefix="hotknob-bench-"))
    daemon = None
    try:
        daemon = Daemon(workdir).start()
        with LiveConfig.connect(daemon.socket_path, timeout=20, client="bench-apply") as live:
            timer = timeit.Timer("live.apply(step)", globals={"live": live, "step": 1})
            best = min(timer.repeat(repeat=repeat, number=number))
            return best / number * 1e9
    finally:
        stop_all(daemon)
        shutil.rmtree(workdir, ignore_errors=True)


def train_step_ns(steps: int) -> float:
    """Median time of one forward/backward/SGD step of a small MLP on the CPU, in ns."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, OUT),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(BATCH, IN)
    y = torch.randint(0, OUT, (BATCH,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(20):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter_ns()
        step()
        times.append(time.perf_counter_ns() - t)
    return float(statistics.median(times))


def run(quick: bool) -> dict[str, Any]:
    per_call = apply_ns(number=200_000 if quick else 1_000_000, repeat=5)
    step = train_step_ns(100 if quick else 500)
    share = per_call / step * 100
    return {
        "figures": [
            f.as_dict()
            for f in (
                at_most("apply(step), nothing pending", per_call, 200, "ns"),
                Figure("small MLP training step (median)", step / 1e6, "ms"),
                at_most("apply as share of the step", share, 1.0, "%"),
            )
        ],
        "params": {"mlp": [IN, HIDDEN, HIDDEN, OUT], "batch": BATCH},
    }
