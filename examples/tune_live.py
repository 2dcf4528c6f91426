"""An outside tuner: reads the loss a run reports and halves ``train.lr`` on a plateau, live.

It needs nothing but the ``hotknob`` command line: ``hotknob status --json``
shows what every process reported with ``live.report`` (the mean of its last
32 values of each metric), ``hotknob get train.lr`` the rate in force, and
``hotknob set train.lr=... --wait`` changes it and waits until every process runs
it (the run applies it at its next step, without a restart).
Run it beside a training run::

    hotknob run --app demo --config examples/config.yaml --etcd-endpoints 127.0.0.1:2379 \\
        --status-every 1 &
    python examples/train.py --app demo --steps 5000 --step-delay 0.01 &
    python examples/tune_live.py --app demo --etcd-endpoints 127.0.0.1:2379 \\
        --config examples/config.yaml

Every ``--interval`` seconds it takes the mean reported loss over all
processes (the daemon rewrites a process's metrics in etcd at most every
``--status-every`` seconds, 5 by default: 1 above, for a tuner that looks
often; a look that finds no newer step is skipped). If that has not improved
on the best seen by ``--min-improvement`` (relative) for ``--patience`` looks
in a row, it sets ``train.lr`` to ``--factor`` times its value. Each change may carry a guard
(``--guard 'loss < 1.5 * baseline'``), so a change that hurts undoes itself: the tuner
then waits for the guard's verdict too (``set --guard ... --wait``: its window, in
steps), says so if the guard reverted the change, and goes on at the rate restored
(a reverted change counts towards ``--max-changes``). It stops, with one line and exit
status 1, when a change does not land as meant within ``--apply-timeout`` seconds: a
daemon rejects it, a process does not apply it, or the guard has not decided by then
(make ``--apply-timeout`` cover the window).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from typing import Any


class Stop(Exception):
    """The tuner cannot go on: why, in one line."""


def run_hotknob(common: list[str], *args: str, timeout: float = 60) -> tuple[int, Any, str]:
    """Run one ``hotknob`` command with ``--json``: its exit status, its output parsed
    (None if there is none) and its error line."""
    done = subprocess.run(
        [sys.executable, "-m", "hotknob.daemon.cli", *args, *common, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    try:
        output = json.loads(done.stdout) if done.stdout.strip() else None
    except ValueError:
        output = None
    return done.returncode, output, error or f"hotknob {args[0]} exited {done.returncode}"


def hotknob(common: list[str], *args: str) -> Any:
    """Run one ``hotknob`` command with ``--json``; its output, parsed."""
    code, output, error = run_hotknob(common, *args)
    if code != 0 or output is None:
        raise Stop(error)
    return output


def change_rate(layers: list[str], lr: float, guard: list[str], timeout: float) -> dict[str, Any]:
    """``set train.lr=LR --wait``, with the guard if any: what ``--json`` says, once every
    process runs it and the guard passed it or reverted it. Anything else stops the
    tuner (``Stop``): a rejection, a process behind, a guard with no verdict in time."""
    args = ("set", f"train.lr={lr:.6g}", *guard, "--wait", f"{timeout:g}")
    code, written, error = run_hotknob(layers, *args, timeout=timeout + 60)
    if written is None:
        raise Stop(error)
    state = (written.get("verdict") or {}).get("state")
    wait = written.get("wait") or {}
    # A rejection stops it even if the guard reverted the change where it applied: a
    # daemon that refuses this rate would refuse the next one too.
    if code == 0 or (state == "reverted" and not wait.get("rejected") and not wait.get("failed")):
        return dict(written)
    # More time helps only a guard that watched every process: a rejection stops it anyway.
    if state == "armed" and wait.get("applied") and not wait.get("rejected"):
        error += " (give --apply-timeout the time the guard's window takes)"
    raise Stop(error)


def reported_loss(common: list[str], metric: str) -> tuple[float, int] | None:
    """The mean of the processes' recent ``metric`` and the furthest step, or None."""
    values, steps = [], []
    for proc in hotknob(common, "status")["processes"]:
        reported = proc.get("metrics") or {}
        value = (reported.get("mean") or {}).get(metric)
        if isinstance(value, int | float):
            values.append(float(value))
            steps.append(int(reported.get("step", 0)))
    if not values:
        return None
    return sum(values) / len(values), max(steps)


def _furthest_step(common: list[str]) -> int:
    """The furthest step at which a process applied the configuration it runs."""
    steps = [p.get("step") for p in hotknob(common, "status")["processes"]]
    return max((s for s in steps if isinstance(s, int)), default=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", default=None, help="daemon app name (or HOTKNOB_APP)")
    parser.add_argument("--etcd-endpoints", default=None, help="(or HOTKNOB_ETCD_ENDPOINTS)")
    parser.add_argument("--config", action="append", default=[], help="as given to the daemon")
    parser.add_argument("--metric", default="loss")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between looks")
    parser.add_argument("--patience", type=int, default=3, help="looks without improvement")
    parser.add_argument("--min-improvement", type=float, default=0.02, help="relative")
    parser.add_argument("--factor", type=float, default=0.5)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--max-changes", type=int, default=3)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds, then stop")
    parser.add_argument(
        "--guard", default=None, help="guard each change, e.g. 'loss < 2 * baseline'"
    )
    parser.add_argument("--window", type=int, default=200, help="steps, with --guard")
    parser.add_argument(
        "--apply-timeout",
        type=float,
        default=60.0,
        help="seconds for every process to apply a change and, with --guard, for the guard "
        "to pass or revert it: its whole window of steps (set --wait); else stop",
    )
    args = parser.parse_args(argv)
    # Refused here, in one line (exit 2): a negative or NaN interval fails in
    # ``time.sleep``, with a traceback, at the first look.
    if not 0 <= args.interval < math.inf:
        parser.error(f"--interval must be 0 or more seconds, got {args.interval}")
    try:
        return tune(args)
    except Stop as exc:
        print(f"tune_live: stopped: {exc.args[0].removeprefix('hotknob: ')}", flush=True)
        return 1


def tune(args: argparse.Namespace) -> int:
    """The loop: look every ``--interval`` seconds, halve on a plateau."""
    common: list[str] = []  # for status, get and set
    if args.app:
        common += ["--app", args.app]
    if args.etcd_endpoints:
        common += ["--etcd-endpoints", args.etcd_endpoints]
    layers = list(common)  # for get and set, which merge the layers (status reads only etcd)
    for path in args.config:
        layers += ["--config", path]

    started = time.monotonic()
    best, stale, changes, last_step = float("inf"), 0, 0, -1
    while time.monotonic() - started < args.duration and changes < args.max_changes:
        time.sleep(args.interval)
        seen = reported_loss(common, args.metric)
        if seen is None:
            print(f"{time.monotonic() - started:5.1f}s  waiting for {args.metric} reports")
            continue
        value, step = seen
        if step <= last_step:
            continue  # nothing new since the last look (or since the last change applied)
        last_step = step
        if value < best * (1 - args.min_improvement):
            best, stale = value, 0
        else:
            stale += 1
        print(
            f"{time.monotonic() - started:5.1f}s  step {step:5d}  {args.metric} {value:.4f}  "
            f"best {best:.4f}  plateau {stale}/{args.patience}",
            flush=True,
        )
        if stale < args.patience:
            continue
        lr = float(hotknob(layers, "get", "train.lr"))
        new_lr = lr * args.factor
        if new_lr < args.min_lr:
            print(f"train.lr {lr:g} is at the floor ({args.min_lr:g}): done", flush=True)
            break
        guard = ["--guard", args.guard, "--window", str(args.window)] if args.guard else []
        written = change_rate(layers, new_lr, guard, args.apply_timeout)
        changes += 1
        applied = written["wait"]
        print(
            f"{time.monotonic() - started:5.1f}s  plateau: train.lr {lr:g} -> {new_lr:.6g} "
            f"(etcd revision {written['revision']}, applied by {len(applied['applied'])} "
            f"process(es) within {applied['seconds']:.1f}s)",
            flush=True,
        )
        verdict = written.get("verdict")
        if verdict is not None:
            reverted = verdict["state"] == "reverted"
            print(
                f"{time.monotonic() - started:5.1f}s  guard {written['guard']} "
                f"{'reverted' if reverted else 'passed'} it: {verdict['outcome'].get('reason')}"
                + (f"; going on at train.lr {lr:g}" if reverted else ""),
                flush=True,
            )
        # Judged afresh from the processes' first reports at the new rate.
        best, stale, last_step = float("inf"), 0, max(step, _furthest_step(common))
    return 0


if __name__ == "__main__":
    sys.exit(main())
