"""``hotknob demo``: the whole path, for real, in about half a minute.

A throwaway etcd (or ``HOTKNOB_ETCD_ENDPOINTS``), a daemon, and
``examples/train.py`` training a small model; part-way through the learning
rate is lowered with ``hotknob set`` (and later two keys change in one
transaction); the demo prints the step at which each change landed, what
``hotknob status`` shows, and writes ``demo.png``: loss and learning rate
against step with every applied change marked. Everything it started is
stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotknob.config import HotknobError, Unavailable

Add = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def register_demo(add: Add, handler: Callable[[argparse.Namespace], int]) -> None:
    p = add("demo", handler, "run etcd, the daemon and a training run; change lr live; plot it")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--step-delay", type=float, default=0.02)
    p.add_argument("--output", default="demo.png", help="where to write the plot")
    p.add_argument("--trainer", default=None, help="path to examples/train.py")


def _find_trainer(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else []
    candidates += [Path.cwd() / "examples" / "train.py"]
    candidates += [Path(__file__).resolve().parents[1] / "examples" / "train.py"]
    for path in candidates:
        if path.is_file():
            return path
    raise HotknobError("cannot find examples/train.py: run the demo from a hotknob checkout")


def _hotknob(*args: str) -> list[str]:
    return [sys.executable, "-m", "hotknob.daemon.cli", *args]


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break  # a line still being written
    return records


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="hotknob-demo-"))
        self.app = args.app if args.app != "default" else "demo"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.etcd: Any = None
        self.common: list[str] = []

    def spawn(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a child and register it for cleanup, with Ctrl-C held off in between,
        so no child can be started and then forgotten."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc = subprocess.Popen(cmd, **kwargs)
            self.procs.append(proc)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return proc

    def say(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    def run_cli(self, *args: str, check: bool = True) -> str:
        cmd = ["hotknob", *args]
        print("$ " + " ".join(cmd), flush=True)
        result = subprocess.run(_hotknob(*args, *self.common), capture_output=True, text=True)
        out = (result.stdout + result.stderr).rstrip()
        if out:
            print(out, flush=True)
        if check and result.returncode != 0:
            raise HotknobError(f"`{' '.join(cmd)}` exited with {result.returncode}")
        return result.stdout

    def start_etcd(self) -> str:
        endpoints = os.environ.get("HOTKNOB_ETCD_ENDPOINTS")
        if endpoints:
            self.say(f"using etcd at {endpoints}")
            return endpoints
        from .local_etcd import LocalEtcd

        self.etcd = LocalEtcd(self.tmp / "etcd")
        self.etcd.start()
        self.say(f"started a throwaway etcd at {self.etcd.endpoint}")
        return str(self.etcd.endpoint)

    def start_daemon(self, sock: Path) -> None:
        with open(self.tmp / "daemon.log", "wb") as log:
            proc = self.spawn(
                _hotknob("run", *self.common, "--log-level", "info"), stdout=log, stderr=log
            )
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.tmp / "daemon.log").read_text()[-2000:]
                raise Unavailable(f"the daemon did not start:\n{tail}")
            time.sleep(0.05)
        self.say(f"daemon serving on {sock}")

    def run(self) -> int:
        args = self.args
        trainer = _find_trainer(args.trainer)
        print(f"working folder: {self.tmp} (removed at the end)", flush=True)
        endpoints = self.start_etcd()
        config = self.tmp / "config.yaml"
        shutil.copy(trainer.parent / "config.yaml", config)
        sock = self.tmp / "hotknob.sock"
        self.common = [
            "--app", self.app, "--etcd-endpoints", endpoints, "--config", str(config),
            "--socket", str(sock), "--state-dir", str(self.tmp / "state"),
        ]  # fmt: skip
        self.run_cli("unset", "train.lr", "train.momentum")  # a clean slate on a shared etcd
        self.start_daemon(sock)
        self.say("where each value comes from")
        self.run_cli("explain", "train")

        log_path = self.tmp / "train.jsonl"
        self.say(f"training {trainer.name} for {args.steps} steps")
        trainer_proc = self.spawn(
            [sys.executable, str(trainer), "--socket", str(sock), "--steps", str(args.steps),
             "--step-delay", str(args.step_delay), "--log", str(log_path), "--print-every", "50"],
        )  # fmt: skip
        plan = [
            (int(args.steps * 0.35), ["train.lr=0.2"], "the loss is stuck: raise lr"),
            (
                int(args.steps * 0.7),
                ["train.lr=0.05", "train.momentum=0.5"],
                "anneal: lower lr and add momentum, two keys in one transaction",
            ),
        ]
        plan_steps = [at for at, _, _ in plan] + [args.steps]
        while trainer_proc.poll() is None:
            records = _read_log(log_path)
            step = records[-1]["step"] if records else -1
            if plan and step >= plan[0][0]:
                _, pairs, why = plan.pop(0)
                self.say(f"step {step}: {why}")
                self.run_cli("set", *pairs)
            time.sleep(0.02)
        if trainer_proc.returncode != 0:
            raise HotknobError(f"the trainer exited with {trainer_proc.returncode}")
        records = _read_log(log_path)
        landed = [r for r in records if "applied" in r]
        self.say("where the changes landed")
        for r in landed:
            print(f"version {r['applied']} applied at step {r['step']}: lr {r['lr']:.6g}")
        for end in plan_steps:
            window = [r["loss"] for r in records if end - 50 <= r["step"] < end]
            if window:
                print(f"mean loss, steps {end - 50}-{end - 1}: {sum(window) / len(window):.4f}")
        if len(landed) < 2:
            raise HotknobError(f"expected 2 live changes to land, saw {len(landed)}")
        self.say("hotknob history train.lr")
        self.run_cli("history", "train.lr", "--limit", "5")
        output = Path(args.output)
        plot(records, output)
        self.say(f"wrote {output.resolve()}")
        return 0

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=6)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.etcd is not None:
            self.etcd.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def plot(records: list[dict[str, Any]], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    losses = [r["loss"] for r in records]
    window = 20
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(losses))
    ]
    ax_loss.plot(steps, losses, lw=0.6, color="tab:blue", alpha=0.35, label="loss")
    ax_loss.plot(steps, smooth, lw=1.8, color="tab:blue", label=f"mean of last {window}")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("hotknob demo: learning rate changed live, no restart")
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    for r in records:
        if "applied" in r:
            for ax in (ax_loss, ax_lr):
                ax.axvline(r["step"], color="tab:red", ls="--", lw=1)
            ax_lr.annotate(
                f"v{r['applied']} @ step {r['step']}\nlr={r['lr']:.3g}",
                (r["step"], r["lr"]),
                xytext=(6, 10),
                textcoords="offset points",
                fontsize=8,
                color="tab:red",
            )
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def cmd_demo(args: argparse.Namespace) -> int:
    demo = Demo(args)
    try:
        return demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything the demo started", file=sys.stderr)
        return 130
    finally:
        demo.cleanup()
