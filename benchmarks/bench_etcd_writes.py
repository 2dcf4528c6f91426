"""What hotknob itself writes to etcd while processes report: status entries.

etcd keeps every revision until its history is compacted, and past its space quota
(2 GiB by default) it refuses every write, a ``set`` and a guard's revert among them
(docs/deploy.md, "etcd's space"). This measures the share of that which is hotknob's
own: two daemons on one etcd, each with ``CLIENTS`` processes (``LiveConfig`` in this
process) that apply and report every step, at ``STEPS_PER_S``, for 30 s (a quick run:
2 s, the processes reporting every 0.25 s instead of the runtime's 1 s). One
daemon runs at the default ``--status-every``, the other at 0 (an entry per report,
which is what every report cost before the default): the same run, the same machine.

The writes are counted exactly, from etcd's history of each daemon's status prefix:
entries per process-second, and their bytes (key and value) per process-hour. etcd's
database grows by more than the bytes (its pages, its index: ~0.5 KB per revision
measured here), so the revisions are the figure to size etcd by. No goal: the issue
sets none; the figures stand beside the sizing in docs/deploy.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.support import Daemon, Etcd, Figure, stop_all

NAME = "etcd_writes"
CLIENTS = 4
STEPS_PER_S = 100.0


def _count(store: Any, prefix: str, after: int, upto: int) -> tuple[int, int]:
    """Writes under ``prefix`` at revisions in ``(after, upto]``: how many, and their bytes."""
    entries = store.history(prefix, prefix=True, limit=1_000_000).entries
    kept = [e for e in entries if after < e.revision <= upto and e.value is not None]
    return len(kept), sum(len(e.key) + len(e.value) for e in kept)


def measure(seconds: float, report_every_s: float | None) -> dict[str, dict[str, float]]:
    """``report_every_s``: the processes' report interval (None: the runtime's default)."""
    from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
    from hotknob.daemon.reports import REPORT_STATUS_EVERY_S
    from hotknob.model_runtime import LiveConfig
    from hotknob.model_runtime.reporting import REPORT_EVERY_ENV

    workdir = Path(tempfile.mkdtemp(prefix="hotknob-bench-"))
    etcd = store = None
    daemons: list[Daemon] = []
    lives: list[Any] = []
    settings = {"default": REPORT_STATUS_EVERY_S, "every report": 0.0}
    try:
        etcd = Etcd().start()
        for i, every in enumerate(settings.values()):
            extra = ["--app", f"writes{i}", "--node", "n", "--status-every", f"{every:g}"]
            daemons.append(Daemon(workdir / f"d{i}", endpoint=etcd.endpoint, extra=extra))
            daemons[-1].start()
        saved_env = os.environ.get(REPORT_EVERY_ENV)
        if report_every_s is not None:
            os.environ[REPORT_EVERY_ENV] = str(report_every_s)
        try:
            for daemon in daemons:
                for c in range(CLIENTS):
                    live = LiveConfig.connect(daemon.socket_path, timeout=20, client=f"p{c}")
                    lives.append(live)
        finally:
            if saved_env is None:
                os.environ.pop(REPORT_EVERY_ENV, None)
            else:
                os.environ[REPORT_EVERY_ENV] = saved_env
        store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)))
        time.sleep(0.5)  # the connections' own entries (their first acks) are in
        start = store.current_revision()
        began = time.monotonic()
        step = 0
        while time.monotonic() - began < seconds:
            step += 1
            for live in lives:
                live.apply(step)
                live.report(step, loss=1.0 / step, grad_norm=0.5)
            time.sleep(max(0.0, began + step / STEPS_PER_S - time.monotonic()))
        end = store.current_revision()
        measured: dict[str, dict[str, float]] = {}
        for i, name in enumerate(settings):
            count, size = _count(store, f"/hotknob/writes{i}/status/", start, end)
            measured[name] = {
                "status_every": settings[name],
                "per_process_s": count / CLIENTS / seconds,
                "mb_per_process_h": size / CLIENTS / seconds * 3600 / 1e6,
            }
        return measured
    finally:
        for live in lives:
            live.close()
        if store is not None:
            store.close()
        stop_all(etcd, *daemons)
        shutil.rmtree(workdir, ignore_errors=True)


def run(quick: bool) -> dict[str, Any]:
    # Quick: 2 s, reports every 0.25 s, so that the two daemons' counts still differ.
    seconds, report_every = (2.0, 0.25) if quick else (30.0, None)
    m = measure(seconds, report_every)
    default, every = m["default"], m["every report"]
    label = f"--status-every {default['status_every']:g} (default)"
    figures = [
        Figure(f"status entries per process-second, {label}", default["per_process_s"], "1/s"),
        Figure("status entries per process-second, every report", every["per_process_s"], "1/s"),
        Figure(f"status bytes per process-hour, {label}", default["mb_per_process_h"], "MB"),
        Figure("status bytes per process-hour, every report", every["mb_per_process_h"], "MB"),
        Figure(
            "default / every report, entries",
            default["per_process_s"] / every["per_process_s"] if every["per_process_s"] else 0.0,
            "x",
        ),
    ]
    return {
        "figures": [f.as_dict() for f in figures],
        "params": {
            "clients_per_daemon": CLIENTS,
            "steps_per_s": STEPS_PER_S,
            "seconds": seconds,
            "report_every_s": report_every or "the runtime's default",
        },
    }
