"""``hotknob demo``: the whole path, for real, in about half a minute.

A throwaway etcd (or the one ``--etcd-endpoints`` / ``HOTKNOB_ETCD_ENDPOINTS``
names), a daemon, and ``examples/train.py`` training a small model; part-way
through the learning rate is raised with ``hotknob set --wait`` (and later two keys
change in one transaction); the demo prints the step at which each change
landed and writes ``demo.png``: loss and learning rate against step with every
applied change marked. Everything it started is stopped at the end, also on
Ctrl-C, SIGTERM or SIGHUP (a closed terminal).

It runs under an app of its own, ``demo-<random>``, so on a shared etcd it
never reads or writes a user's keys; it deletes what it wrote there
(``/hotknob/demo-<random>/``) at the end. Its children see none of the
caller's ``HOTKNOB_*`` variables but the etcd ones it passes on (a schema, a
metrics port or a ``HOTKNOB_PARAM_*`` value meant for a real job would change
or break the demo).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotknob.config import HotknobError, Unavailable, UsageError
from hotknob.config.keys import ROOT

Add = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def register_demo(add: Add, handler: Callable[[argparse.Namespace], int]) -> None:
    p = add("demo", handler, "run etcd, the daemon and a training run; change lr live; plot it")
    p.add_argument(
        "--steps", type=int, default=400, metavar="N", help="training steps (default: %(default)s)"
    )
    p.add_argument(
        "--step-delay",
        type=float,
        default=0.02,
        metavar="SECONDS",
        help="pause per step (default: %(default)s)",
    )
    p.add_argument(
        "--output", default="demo.png", metavar="FILE", help="the plot (default: %(default)s)"
    )
    p.add_argument(
        "--trainer",
        default=None,
        metavar="FILE",
        help="path to examples/train.py (default: found in the current folder or the checkout)",
    )


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


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """One of ``_STOP_SIGNALS`` arrived: raised where the demo was, as Ctrl-C is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._holding = False  # a stop signal now is kept for later (``_on_signal``)
        self._held: int | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="hotknob-demo-"))
        self.app = f"demo-{secrets.token_hex(4)}"  # its own: never a user's keys
        self.procs: list[subprocess.Popen[bytes]] = []
        self.etcd: Any = None
        self.shared_etcd = False  # one the caller named: what the demo wrote is deleted
        self.env = _child_env({})
        self.etcd_args = ["--etcd-timeout", str(args.etcd_timeout)]
        self.layer_args: list[str] = []

    def on_signal(self, signum: int, frame: object) -> None:
        """The handler of ``_STOP_SIGNALS``: raise ``Stopped``, unless one is held off."""
        if self._holding:
            self._held = signum
            return
        raise Stopped(signum)

    def spawn(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a child and register it for cleanup, with stop signals held off in
        between, so no child can be started and then forgotten. Held off by the handler,
        not by a blocked signal mask, which the child would inherit."""
        self._holding = True
        try:
            proc = subprocess.Popen(cmd, **kwargs)
            self.procs.append(proc)
        finally:
            self._holding = False
            if self._held is not None:
                raise Stopped(self._held)
        return proc

    def say(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    def run_cli(
        self,
        *args: str,
        layers: bool = True,
        check: bool = True,
        trainer: subprocess.Popen[bytes] | None = None,
    ) -> str:
        """Run ``hotknob ARGS`` against the demo's etcd (``layers``: with its app and config).

        ``trainer``: the training run a ``set --wait`` waits for. Once it has exited (a run
        too short for the change, or one that failed), the command is given a few seconds,
        then stopped: its ``--wait`` could only time out, 30 s later, with no process left.
        """
        cmd = ["hotknob", *args]
        print("$ " + " ".join(cmd), flush=True)
        extra = [*self.etcd_args, *(self.layer_args if layers else ["--app", self.app])]
        proc = subprocess.Popen(
            _hotknob(*args, *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        try:
            ended_at: float | None = None  # when the trainer was first seen gone
            while proc.poll() is None:
                if trainer is not None and trainer.poll() is not None:
                    ended_at = ended_at or time.monotonic()
                    if time.monotonic() - ended_at > 3:
                        proc.terminate()
                        break
                time.sleep(0.02)
            stdout, stderr = proc.communicate()  # a few lines: no pipe fills meanwhile
        finally:
            if proc.poll() is None:  # interrupted: the command goes with the demo
                proc.kill()
                proc.wait()
        out = (stdout + stderr).rstrip()
        if out:
            print(out, flush=True)
        if check and proc.returncode != 0:
            if trainer is not None and trainer.poll() is not None:
                raise HotknobError(
                    f"the trainer exited (code {trainer.returncode}) before `{' '.join(cmd)}` "
                    "saw the change applied: give the demo more --steps or a longer --step-delay"
                )
            raise HotknobError(f"`{' '.join(cmd)}` exited with {proc.returncode}")
        return stdout

    def start_etcd(self) -> None:
        """The caller's etcd (``--etcd-endpoints``, else ``HOTKNOB_ETCD_ENDPOINTS``), with
        its user, password and TLS files, or a throwaway one; passed on to the children in
        their environment (a password on a command line is visible to every user)."""
        args = self.args
        if args.etcd_endpoints:
            self.shared_etcd = True
            self.env = _child_env(
                {
                    "HOTKNOB_ETCD_ENDPOINTS": args.etcd_endpoints,
                    "HOTKNOB_ETCD_USER": args.etcd_user,
                    "HOTKNOB_ETCD_PASSWORD": args.etcd_password,
                    "HOTKNOB_ETCD_CA": args.etcd_ca,
                    "HOTKNOB_ETCD_CERT": args.etcd_cert,
                    "HOTKNOB_ETCD_KEY": args.etcd_key,
                }
            )
            self.say(
                f"using etcd at {args.etcd_endpoints}, under the app {self.app} "
                f"(its keys, {ROOT}/{self.app}/, are deleted at the end)"
            )
            return
        from .local_etcd import LocalEtcd

        self.etcd = LocalEtcd(self.tmp / "etcd")
        self.etcd.start()
        self.env = _child_env({"HOTKNOB_ETCD_ENDPOINTS": str(self.etcd.endpoint)})
        self.say(f"started a throwaway etcd at {self.etcd.endpoint}")

    def start_daemon(self, sock: Path) -> None:
        cmd = _hotknob(
            "run", *self.layer_args, *self.etcd_args, "--socket", str(sock),
            "--state-dir", str(self.tmp / "state"), "--log-level", "info",
        )  # fmt: skip
        with open(self.tmp / "daemon.log", "wb") as log:
            proc = self.spawn(cmd, stdout=log, stderr=log, env=self.env)
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
        self.start_etcd()
        config = self.tmp / "config.yaml"
        shutil.copy(trainer.parent / "config.yaml", config)
        sock = self.tmp / "hotknob.sock"
        self.layer_args = ["--app", self.app, "--config", str(config)]
        self.start_daemon(sock)
        self.say("where each value comes from")
        self.run_cli("explain", "train")

        log_path = self.tmp / "train.jsonl"
        self.say(f"training {trainer.name} for {args.steps} steps")
        trainer_proc = self.spawn(
            [sys.executable, str(trainer), "--socket", str(sock), "--steps", str(args.steps),
             "--step-delay", str(args.step_delay), "--log-file", str(log_path),
             "--print-every", "50"],
            env=self.env,
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
                self.run_cli("set", *pairs, "--wait", "30", trainer=trainer_proc)
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
        self.run_cli("history", "train.lr", "--limit", "5", layers=False)
        output = Path(args.output)
        plot(records, output)
        self.say(f"wrote {output.resolve()}")
        return 0

    def cleanup(self) -> None:
        self._holding = True  # another stop signal must not cut the cleanup short
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=6)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.shared_etcd:
            self.delete_keys()
        if self.etcd is not None:
            self.etcd.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def delete_keys(self) -> None:
        """Delete every key under the demo's own app from the caller's etcd (the daemon is
        stopped by now, so its status entries are gone with their leases)."""
        from .context import etcd_options
        from .etcd_store import EtcdStore

        prefix = f"{ROOT}/{self.app}/"
        options = etcd_options(self.args)
        assert options is not None
        store: EtcdStore | None = None
        try:
            store = EtcdStore(options)
            kvs, _ = store.read_prefix(prefix)
            if kvs:
                store.commit({}, list(kvs))
        except HotknobError as exc:
            print(
                f"hotknob: warning: could not delete the demo's keys under {prefix}: {exc}",
                file=sys.stderr,
            )
        finally:
            if store is not None:
                store.close()


def _child_env(etcd: dict[str, str | None]) -> dict[str, str]:
    """The environment of the demo's children: the caller's without any ``HOTKNOB_*``
    variable, plus the etcd settings given (those that are set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTKNOB_")}
    env.update({k: v for k, v in etcd.items() if v})
    return env


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


def _check_args(args: argparse.Namespace) -> None:
    """Refuse what could only fail once etcd, the daemon and the trainer run: a trainer
    that cannot take ``--steps`` or ``--step-delay`` exits with a traceback, and a plot
    into a folder that does not exist fails after the whole run."""
    if args.steps < 1:
        raise UsageError(f"demo: --steps must be 1 or more, got {args.steps}")
    if not 0 <= args.step_delay < math.inf:
        raise UsageError(f"demo: --step-delay must be 0 or more seconds, got {args.step_delay}")
    folder = Path(args.output).parent
    if not folder.is_dir():
        raise UsageError(f"demo: --output: no folder {str(folder)!r} to write the plot in")


def cmd_demo(args: argparse.Namespace) -> int:
    _check_args(args)
    demo = Demo(args)
    previous = {signum: signal.signal(signum, demo.on_signal) for signum in _STOP_SIGNALS}
    try:
        return demo.run()
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        what = "interrupted" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{what}: stopping everything the demo started", file=sys.stderr)
        return 128 + signum
    finally:
        demo.cleanup()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
