"""A small real training run that takes its hyper-parameters live from a hotknob daemon.

Run an etcd and a daemon first (``export HOTKNOB_ETCD_ENDPOINTS=127.0.0.1:2379``, then
``hotknob run --app demo --config examples/config.yaml``), then ``python
examples/train.py --app demo``; while it trains, change the learning rate with
``hotknob set --app demo train.lr=0.01`` (it writes etcd: without the endpoints it is a
usage error) and watch the ``lr`` column change at the next step.

Every ``--print-every`` steps (20) it prints ``step loss lr version``, and a line at each
change applied; ``--log-file FILE`` also writes one JSON object per step, which
``hotknob demo`` plots.

Under ``torchrun`` (``python -m torch.distributed.run --nproc-per-node 2 examples/train.py
--app demo --log-file run-{rank}.jsonl``) every rank trains its own batches of a
``DistributedDataParallel`` model over gloo, and the ranks take each change at the same
step (``LiveConfig.connect(distributed=True)``); rank 0 prints, and ``{rank}`` in
``--log-file`` names each rank's file (``--log`` would be taken by torchrun for its own
``--log-dir``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from hotknob.model_runtime import LiveConfig


def make_data(n: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the outputs of a random teacher network, plus a little noise."""
    x = torch.randn(n, dim, generator=generator)
    w1 = torch.randn(dim, 32, generator=generator) / 4
    w2 = torch.randn(32, 1, generator=generator)
    y = torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(n, 1, generator=generator)
    return x, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", default=None, help="daemon app name (or HOTKNOB_APP)")
    parser.add_argument("--socket", default=None, help="daemon socket (or HOTKNOB_SOCKET)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step")
    parser.add_argument("--scheduler", choices=["none", "cosine", "step"], default="none")
    parser.add_argument(
        "--log-file", default=None, help="write one JSON line per step here ({rank}: the rank's)"
    )
    parser.add_argument("--print-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Refused here, in one line (exit 2), not as a traceback once the run has connected:
    # a negative or NaN delay fails in ``time.sleep``, ``--print-every 0`` in ``step % 0``.
    if args.steps < 0:
        parser.error(f"--steps must be 0 or more, got {args.steps}")
    if not 0 <= args.step_delay < math.inf:
        parser.error(f"--step-delay must be 0 or more seconds, got {args.step_delay}")
    if args.print_every < 1:
        parser.error(f"--print-every must be 1 or more, got {args.print_every}")

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun
    rank = 0
    if distributed:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    torch.manual_seed(args.seed)  # the same data and first weights on every rank
    generator = torch.Generator().manual_seed(args.seed)
    x, y = make_data(4096, 16, generator)
    generator.manual_seed(args.seed + rank)  # each rank its own batches
    net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if distributed else net
    live = LiveConfig.connect(socket=args.socket, app=args.app, timeout=30, distributed=distributed)
    optimizer = torch.optim.SGD(model.parameters(), lr=live["train.lr"], momentum=0.0)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    if args.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    elif args.scheduler == "step":
        # At least 1: StepLR divides by it at every step (``--steps 3`` would give 0).
        step_size = max(1, args.steps // 4)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.5)
    live.bind_optimizer(optimizer, scheduler)
    path = args.log_file.replace("{rank}", str(rank)) if args.log_file else None
    try:
        log = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed below
    except OSError as exc:  # a missing folder, say: one line, and the daemon let go
        print(f"error: --log-file: {exc}", file=sys.stderr)
        live.close()
        if distributed:
            dist.destroy_process_group()
        return 1
    say = print if rank == 0 else lambda *a, **k: None
    say(f"connected: version {live.version}, lr {live['train.lr']}", flush=True)
    try:
        for step in range(args.steps):
            changed = live.apply(step)  # the safe point: pending changes land here, acked
            batch = torch.randint(0, x.shape[0], (64,), generator=generator)
            loss = nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip = live["train.grad_clip"]
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            value = loss.item()
            lr = optimizer.param_groups[0]["lr"]
            if hasattr(live, "report"):
                live.report(step, loss=value)
            record = {"step": step, "loss": value, "lr": lr, "version": live.version}
            if changed:
                record["applied"] = live.version
                say(f"step {step}: applied version {live.version}, lr now {lr:.6g}", flush=True)
            if log:
                log.write(json.dumps(record) + "\n")
            if step % args.print_every == 0 or not math.isfinite(value):
                say(f"step {step:5d}  loss {value:.5f}  lr {lr:.6g}  v{live.version}", flush=True)
            if args.step_delay:
                time.sleep(args.step_delay)
    finally:
        if log:
            log.close()
        live.close()
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
