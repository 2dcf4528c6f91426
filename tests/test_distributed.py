"""Four torch.distributed ranks on two daemons apply every change at the same step.

Two "nodes": two real ``hotknob run`` processes on one real etcd, each with its
own socket; ranks 0 and 1 talk to daemon A, ranks 2 and 3 to daemon B. The ranks
are real processes training a small DDP model over gloo. While a stream of lr
changes goes into etcd, daemon B is frozen (SIGSTOP) for a while, so its ranks
fall behind. Every rank's per-step lr log must be identical, the last put must
land, and the ranks on A must visibly hold newer values back while B is frozen.

The workers run this module as a script (``python -m tests.test_distributed``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(90)

APP = "t"
P = f"/hotknob/{APP}/config/"
WORLD = 4
SYNC_EVERY = 4
MAX_STEPS = 6000
INITIAL_LR = 0.5
PUT_LRS = [round(0.01 * (i + 1), 4) for i in range(10)]
FROZEN = range(3, 8)  # daemon B is stopped from before put 3 to after put 7
ROOT = Path(__file__).resolve().parent.parent


# -- the worker: one rank, in its own process ------------------------------------------


def _agreed_flag(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def worker(rank: int, rdzv: str, socket_path: str, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hotknob.model_runtime import LiveConfig

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    )
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    live = LiveConfig.connect(
        socket=socket_path, timeout=20, distributed=True, sync_every=SYNC_EVERY
    )
    live.bind_optimizer(opt)
    (out / f"ready-{rank}").touch()
    gen = torch.Generator().manual_seed(rank)
    lrs: list[float] = []
    applied: list[list[Any]] = [[0, live.version, live.revision, live["train.lr"]]]
    held, max_held = 0, 0
    step = 0
    while step < MAX_STEPS:
        x = torch.randn(16, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if live.apply(step):
            applied.append([step, live.version, live.revision, live["train.lr"]])
        lrs.append(opt.param_groups[0]["lr"])
        held = held + 1 if live.pending_version > live.version else 0
        max_held = max(max_held, held)
        if live["train.lr"] == PUT_LRS[-1]:
            break
        if step % 50 == 0 and _agreed_flag((out / "abort").exists()):
            break
        step += 1
        time.sleep(0.002)
    result = {"rank": rank, "lrs": lrs, "applied": applied, "max_held": max_held}
    (out / f"result-{rank}.tmp").write_text(json.dumps(result))
    (out / f"result-{rank}.tmp").rename(out / f"result-{rank}.json")
    deadline = time.monotonic() + 60
    while not (out / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    live.close()
    dist.destroy_process_group()


def protocol_worker(rank: int, rdzv: str, out: Path) -> None:
    """Two ranks, each with its own stub daemon, driven through the protocol's cases.

    Each phase pushes to the stubs, waits until the push reached this rank, meets
    the other rank at a barrier, then calls ``apply``: the outcome does not depend
    on timing, only on what each rank holds.
    """
    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig
    from tests.daemon_stub import DaemonStub

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    base = {"train": {"lr": 0.001}}
    steps: list[list[Any]] = []
    with DaemonStub(str(out / f"stub-{rank}.sock"), base) as stub:
        # 0: ranks given different sync_every are refused on every rank, at connect.
        try:
            LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=2 + 2 * rank)
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        # ... and so is a sync_every that one rank alone was given wrong: on every rank,
        # with no rank left waiting in the collective.
        try:
            LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=3 - 3 * rank)
            invalid = ""
        except ValueError as exc:
            invalid = str(exc)
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=3)
        step = 0

        def phase(lr: float | None, revision: int | None = None, calls: int = 3) -> None:
            nonlocal step
            if lr is not None:
                if revision is not None:
                    stub.revision = revision - 1
                version = stub.push({"train": {"lr": lr}})
                stub.wait_for(lambda: live.pending_version == version)
            dist.barrier()
            for _ in range(calls):
                step += 1
                steps.append([step, live.apply(step), live["train.lr"]])

        phase(0.002)  # both receive it: applied at the 3rd call only
        phase(0.003 if rank == 0 else None)  # rank 1 has nothing newer: nothing is applied
        phase(None if rank == 0 else 0.004, revision=103)  # rank 1 jumps past 0.003
        phase(0.004 if rank == 0 else None, revision=103)  # now both hold 0.004
        phase(0.005 if rank == 0 else 0.006, revision=104)  # same revision, other values
        # Rank 1's daemon never sent 0.003 nor 0.005; it is told that rank 1 runs rank 0's
        # 0.005 in place of its 0.006 (its version 4, at the same revision).
        last_ack = 5 if rank == 0 else 4
        stub.wait_for(lambda: stub.messages("applied")[-1]["version"] == last_ack)
        acked = [m["version"] for m in stub.messages("applied")]
        agreed = [m.get("agreed") for m in stub.messages("applied")]
        # 6: a checkpoint loaded on every rank stays in force over the daemons' older
        # states, as in a single process; 7: an edit after it is applied.
        saved = live.state_dict()
        saved["version"], saved["values"]["train"]["lr"] = 99, 0.5
        live.load_state_dict(saved)
        phase(None)
        phase(0.007)
        # 8: a checkpoint saved before the last edit, at rank 0's version 5 and revision
        # 104; the edit (revision 105) is version 6 for rank 0's daemon, 4 for rank 1's.
        # Rank 0's daemon is newer than the checkpoint, rank 1's is not: both ranks go
        # back to their daemons' states at the next agreement. (Rank 1 kept the
        # checkpoint alone, and its lower revision won: the ranks stayed on it.)
        saved = live.state_dict()
        assert saved["revision"] == 105
        saved["version"], saved["revision"], saved["values"]["train"]["lr"] = 5, 104, 0.8
        live.load_state_dict(saved)
        phase(None)
        phase(None)
        live.close()
    result = {
        "steps": steps,
        "acked": acked,
        "agreed": agreed,
        "version": live.version,
        "refused": refused,
        "invalid": invalid,
    }
    (out / f"protocol-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def tie_worker(rank: int, rdzv: str, out: Path) -> None:
    """Two ranks, each with its own stub daemon, through file edits: the daemon keeps the
    etcd revision for those, so the ranks cannot tell by revision which values are newer."""
    import logging

    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig
    from tests.daemon_stub import DaemonStub

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hotknob.model_runtime").addHandler(handler)
    steps: list[list[Any]] = []
    versions: list[int] = []
    with DaemonStub(str(out / f"tie-{rank}.sock"), {"train": {"lr": 0.001}}) as stub:
        live = LiveConfig.connect(stub.path, timeout=10, distributed=True, sync_every=1)
        step = 0

        def phase(lr: float | None, version: int | None = None) -> None:
            nonlocal step
            if lr is not None:
                stub.revision -= 1  # a file edit: the same etcd revision
                if version is not None:
                    stub.version = version - 1
                pushed = stub.push({"train": {"lr": lr}})
                stub.wait_for(lambda: live._received_states()[-1].version == pushed)
            dist.barrier()
            for _ in range(2):
                step += 1
                steps.append([step, live.apply(step), live["train.lr"]])
                versions.append(live.version)

        phase(0.002 if rank == 0 else None)  # 1: only rank 0 holds the edit yet
        phase(None if rank == 0 else 0.002)  # 2: now both do
        phase(0.003 if rank == 0 else 0.004)  # 3: the nodes' files differ: rank 0's win
        phase(None if rank == 0 else 0.003, version=3)  # 4: rank 1's daemon sends them too
        phase(0.005 if rank == 0 else 0.006)  # 5: again, and then
        phase(None if rank == 0 else 0.005, version=6)  # 6: under another version
        phase(None if rank == 0 else 0.005, version=20)  # 7: its daemon restarted, renumbered
        stub.wait_for(lambda: len(stub.messages("applied")) == 4 + 3 * rank)
        acked = [[m["version"], m["step"], m.get("agreed")] for m in stub.messages("applied")]
        live.close()
    result = {"steps": steps, "versions": versions, "acked": acked, "warned": warned}
    (out / f"tie-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def restart_only_worker(rank: int, rdzv: str, out: Path) -> None:
    """Two ranks, each with its own stub daemon, load a checkpoint that rank 0's daemon is
    newer than (version 5 over 3) and rank 1's is not (version 1): each rank decides that
    alone, at the load."""
    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig
    from tests.daemon_stub import DaemonStub

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    base = {"train": {"lr": 0.001, "batch_size": 64}}
    version = 5 if rank == 0 else 1
    restart_only = ("train.batch_size",)
    with DaemonStub(out / f"ro-{rank}.sock", base, version=version, restart_only=restart_only):
        live = LiveConfig.connect(
            str(out / f"ro-{rank}.sock"), timeout=10, distributed=True, sync_every=1
        )
        saved = live.state_dict()
        saved["version"] = 3
        saved["values"]["train"] = {"lr": 0.5, "batch_size": 16}
        live.load_state_dict(saved)
        loaded = [live["train.batch_size"], live["train.lr"]]
        steps = [[step, live.apply(step), live["train.batch_size"]] for step in range(1, 4)]
        live.close()
    result = {"loaded": loaded, "steps": steps}
    (out / f"restart_only-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def subgroup_worker(rank: int, rdzv: str, out: Path) -> None:
    """Four ranks in two groups of two (``process_group=``), each rank with its own stub
    daemon; the two daemons of a group hold different values at one revision."""
    import logging

    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig
    from tests.daemon_stub import DaemonStub

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=4)
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes both
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hotknob.model_runtime").addHandler(handler)
    path = out / f"group-{rank}.sock"
    with DaemonStub(path, {"train": {"lr": 0.001 * (rank + 1)}}):
        live = LiveConfig.connect(
            str(path), timeout=10, distributed=True, process_group=groups[rank // 2]
        )
        lr = live["train.lr"]
        live.close()
    (out / f"subgroup-{rank}.json").write_text(json.dumps({"lr": lr, "warned": warned}))
    dist.barrier()
    dist.destroy_process_group()


def layers_worker(rank: int, rdzv: str, out: Path) -> None:
    """Two ranks, each with its own real daemon (its socket in ``layers-socket-RANK``),
    applying every call until ``stop`` exists; each value change logged with its step."""
    import torch.distributed as dist

    from hotknob.model_runtime import LiveConfig

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    path = (out / f"layers-socket-{rank}").read_text()
    live = LiveConfig.connect(path, timeout=20, distributed=True, sync_every=1)
    changes = [[0, live["train.lr"], live["train.momentum"]]]
    (out / f"layers-ready-{rank}").touch()
    step = 0
    while step % 20 or not _agreed_flag((out / "stop").exists()):
        step += 1
        if live.apply(step):
            changes.append([step, live["train.lr"], live["train.momentum"]])
        time.sleep(0.005)
    live.close()
    (out / f"layers-{rank}.json").write_text(json.dumps({"changes": changes}))
    dist.destroy_process_group()


def absent_worker(rank: int, rdzv: str, out: Path) -> None:
    """Two ranks; only rank 0's node has a daemon (a stub)."""
    import torch.distributed as dist

    from hotknob.model_runtime import DaemonUnavailable, LiveConfig
    from tests.daemon_stub import DaemonStub

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    path = out / f"absent-{rank}.sock"
    stub = DaemonStub(path, {"train": {"lr": 0.001}}) if rank == 0 else None
    if stub is not None:
        stub.start()
    try:
        LiveConfig.connect(str(path), timeout=2, distributed=True)
        error = ""
    except DaemonUnavailable as exc:
        error = str(exc)
    finally:
        if stub is not None:
            stub.stop()
    (out / f"absent-{rank}.json").write_text(json.dumps({"error": error}))
    dist.destroy_process_group()


# -- the tests --------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    procs: Sequence[subprocess.Popen[bytes]] = (),
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() not in (None, 0):
                raise AssertionError(f"a worker exited with {p.returncode} while waiting: {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.02)


def status_entries(etcd: EtcdServer) -> list[dict[str, Any]]:
    done = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint, "--json")
    assert done.returncode == 0, done.stderr
    entries: list[dict[str, Any]] = json.loads(done.stdout)["processes"]
    return entries


def test_four_ranks_two_daemons_apply_every_change_at_the_same_step(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore

    etcd.etcdctl("put", P + "train/lr", str(INITIAL_LR))
    out = tmp_path / "out"
    out.mkdir()
    node_a = DaemonProcess(tmp_path / "a", endpoints=etcd.endpoint, extra=["--node", "nA"])
    node_b = DaemonProcess(tmp_path / "b", endpoints=etcd.endpoint, extra=["--node", "nB"])
    writer = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        node_a.start()
        node_b.start()
        for rank in range(WORLD):
            daemon = node_a if rank < 2 else node_b
            log = open(out / f"worker-{rank}.log", "wb")  # noqa: SIM115 (the child keeps it)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.test_distributed", str(rank),
                     str(tmp_path / "rdzv"), str(daemon.socket_path), str(out)],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
            )  # fmt: skip
            log.close()
        ready = [out / f"ready-{r}" for r in range(WORLD)]
        wait_for(lambda: all(p.exists() for p in ready), 45, "ranks ready", procs)

        revisions = []
        for i, lr in enumerate(PUT_LRS):
            if i == FROZEN.start:
                node_b.signal(signal.SIGSTOP)
            if i == FROZEN.stop:
                time.sleep(0.4)  # A's ranks hold the newest puts; B's have none of them
                node_b.signal(signal.SIGCONT)
            revisions.append(writer.put(P + "train/lr", json.dumps(lr)))
            time.sleep(0.12)

        wait_for(
            lambda: all((out / f"result-{r}.json").exists() for r in range(WORLD)),
            45,
            "every rank finished",
            procs,
        )
        results = [json.loads((out / f"result-{r}.json").read_text()) for r in range(WORLD)]

        # While the ranks are still connected, status shows all four with their ranks,
        # each at the last put's revision.
        def all_acknowledged() -> bool:
            entries = status_entries(etcd)
            ranks = sorted(e.get("rank", -1) for e in entries)
            return ranks == [0, 1, 2, 3] and all(e["revision"] == revisions[-1] for e in entries)

        wait_for(all_acknowledged, 15, "status shows ranks 0..3 at the last revision")
        entries = status_entries(etcd)
        assert {e["node"] for e in entries} == {"nA", "nB"}
        assert all(e["world_size"] == WORLD for e in entries)
        assert all(e["client"].endswith(f"-rank{e['rank']}") for e in entries)
    finally:
        if node_b.proc is not None and node_b.proc.poll() is None:
            node_b.signal(signal.SIGCONT)
        (out / "abort").touch()
        (out / "release").touch()
        _reap(procs)
        writer.close()
        node_a.stop()
        node_b.stop()
    for r, p in enumerate(procs):
        assert p.returncode == 0, (out / f"worker-{r}.log").read_text()

    first = results[0]
    for other in results[1:]:
        assert other["lrs"] == first["lrs"], f"rank {other['rank']} applied at other steps"
        assert other["applied"] == first["applied"], f"rank {other['rank']} applied other states"
    assert first["lrs"][-1] == PUT_LRS[-1], "the last change never landed"
    applied_revisions = [rev for _, _, rev, _ in first["applied"][1:]]
    assert applied_revisions == sorted(set(applied_revisions)), "applied out of order or twice"
    assert set(applied_revisions) <= set(revisions)
    for _, _, rev, lr in first["applied"][1:]:
        assert lr == PUT_LRS[revisions.index(rev)]
    # The freeze was felt: A's ranks held newer values back for several agreements.
    assert min(results[0]["max_held"], results[1]["max_held"]) >= 3 * SYNC_EVERY
    print(
        f"steps={len(first['lrs'])} applied={len(first['applied']) - 1} of {len(PUT_LRS)} puts, "
        f"held back on node A for up to {results[0]['max_held']} steps"
    )


def test_choose_source_takes_the_lowest_revision_then_the_lowest_rank() -> None:
    from hotknob.model_runtime.distributed import choose_source

    assert choose_source([(5, 1), (7, 2), (5, 3)]) == 0
    assert choose_source([(9, 1), (7, 2), (7, 3), (8, 4)]) == 1
    assert choose_source([(0, 4)]) == 0


def test_protocol_cases_two_ranks_each_with_its_own_daemon(tmp_path: Path) -> None:
    r0, r1 = _run_two_ranks("protocol", tmp_path)
    assert "different sync_every (from 2 to 4)" in r0["refused"] == r1["refused"]
    assert "another rank was given a sync_every that is not an integer >= 1" in r0["invalid"]
    assert "sync_every must be an integer >= 1, not 0" in r1["invalid"]
    assert r0["steps"] == r1["steps"]
    lr_at = {step: lr for step, _, lr in r0["steps"]}
    applied_at = [step for step, applied, _ in r0["steps"] if applied]
    # 1: both hold 0.002, applied at the 3rd call (sync_every=3), not before.
    assert [lr_at[s] for s in (1, 2, 3)] == [0.001, 0.001, 0.002]
    # 2: only rank 0 holds 0.003: the ranks keep 0.002.
    assert [lr_at[s] for s in (4, 5, 6)] == [0.002] * 3
    # 3: rank 1 jumped to 0.004 (revision 103) past 0.003 (revision 102): the agreed
    # state is 0.003, which rank 1 never received; rank 0 broadcasts it.
    assert lr_at[9] == 0.003
    # 4: both hold 0.004.
    assert lr_at[12] == 0.004
    # 5: the daemons disagree at one revision: rank 0's values win on both.
    assert lr_at[15] == 0.005
    # 6: the loaded checkpoint holds; 7: the edit after it is applied on both.
    assert [lr_at[s] for s in (16, 17, 18)] == [0.5] * 3
    assert [lr_at[s] for s in (19, 20, 21)] == [0.5, 0.5, 0.007]
    # 8: any rank's daemon newer than the checkpoint: both take their daemons' state back.
    assert [lr_at[s] for s in (22, 23, 24, 25, 26, 27)] == [0.8, 0.8, 0.007, 0.007, 0.007, 0.007]
    assert applied_at == [3, 9, 12, 15, 21, 24]
    # Rank 1 never acknowledges values that its own daemon did not send (0.003, 0.005);
    # it says it runs rank 0's 0.005 in place of its daemon's 0.006 (version 4), which
    # is at the same revision, not 0.003 in place of 0.004, a later revision it holds.
    assert r1["acked"] == [1, 2, 3, 4]
    assert r1["agreed"] == [None, None, None, {"rank": 0, "revision": 104}]
    assert r0["acked"] == [1, 2, 3, 4, 5]
    assert r0["agreed"] == [None] * 5


def test_a_checkpoint_loaded_on_every_rank_keeps_the_agreed_restart_only_values(
    tmp_path: Path,
) -> None:
    """Only rank 0's daemon is newer than the checkpoint: rank 0 took its daemon's batch
    size at the load and rank 1 the checkpoint's, so a data loader built right after the
    load differed across ranks. Every rank keeps the values the ranks agreed on."""
    r0, r1 = _run_two_ranks("restart_only", tmp_path)
    assert r0["loaded"] == r1["loaded"] == [64, 0.5]
    assert r0["steps"] == r1["steps"]
    # Rank 0's daemon is newer: both take their daemons' state back, at the first call.
    assert r0["steps"] == [[1, True, 64], [2, False, 64], [3, False, 64]]


def test_under_a_process_group_the_warning_names_the_global_rank(tmp_path: Path) -> None:
    """``live_ranks_disagree`` named the winner by its rank in the group: "rank 0's values
    win" on ranks 2 and 3, whose group's first rank is global rank 2, as status names it."""
    results = _run_two_ranks("subgroup", tmp_path, world=4)
    assert [r["lr"] for r in results] == [0.001, 0.001, 0.003, 0.003]
    warned = [[w for w in r["warned"] if w.startswith("live_ranks_disagree")] for r in results]
    assert [len(w) for w in warned] == [0, 1, 0, 1]  # the ranks whose values lost say so
    assert "rank 0's values win" in warned[1][0], warned
    assert "rank 2's values win" in warned[3][0], warned


def test_a_rank_whose_daemon_answered_names_the_rank_that_got_nothing(tmp_path: Path) -> None:
    """Rank 0's daemon is up, rank 1's is not: rank 0's error said there was no daemon at
    its own socket and told it to start one there."""
    r0, r1 = _run_two_ranks("absent", tmp_path)
    assert r0["error"].startswith("rank(s) 1 got no snapshot from their hotknob daemon"), r0
    assert "absent-0.sock, answered" in r0["error"]
    assert r1["error"].startswith("no hotknob daemon at "), r1
    assert (
        "absent-1.sock after 2 s: start one with `hotknob run --app default --socket "
        in (
            r1["error"]  # at the socket it was given, not at the app's default one
        )
    )
    assert "(ranks without one: 1)" in r1["error"]


def _reap(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """Wait for each rank to end (told to stop), killing one that takes over ``timeout``."""
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _start_ranks(
    kind: str, tmp_path: Path, world: int = 2, module: str = "tests.test_distributed"
) -> list[subprocess.Popen[bytes]]:
    """Start ``python -m MODULE KIND RANK ...`` for each rank of ``world``."""
    procs = []
    for rank in range(world):
        log = open(tmp_path / f"{kind}-{rank}.log", "wb")  # noqa: SIM115 (the child keeps it)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, kind, str(rank),
                 str(tmp_path / "rdzv"), str(tmp_path)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        )  # fmt: skip
        log.close()
    return procs


def _run_two_ranks(
    kind: str, tmp_path: Path, world: int = 2, module: str = "tests.test_distributed"
) -> list[dict[str, Any]]:
    """Run ``python -m MODULE KIND RANK ...`` for each rank of ``world`` (ranks 0 and 1);
    their results."""
    procs = _start_ranks(kind, tmp_path, world, module)
    try:
        for p in procs:
            p.wait(timeout=45)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"{kind}-{rank}.log").read_text()
    return [json.loads((tmp_path / f"{kind}-{r}.json").read_text()) for r in range(world)]


def test_a_file_edit_waits_for_every_rank_and_values_from_another_rank_are_acked_later(
    tmp_path: Path,
) -> None:
    r0, r1 = _run_two_ranks("tie", tmp_path)
    assert r0["steps"] == r1["steps"]
    lr_at = {step: lr for step, _, lr in r0["steps"]}
    applied_at = [step for step, applied, _ in r0["steps"] if applied]
    # 1: a file edit (same revision) only rank 0 holds is not applied; 2: once both do, it is.
    assert [lr_at[s] for s in (1, 2, 3)] == [0.001, 0.001, 0.002]
    # 3: neither holds the other's values at that revision: rank 0's win (5); 4: rank 1's
    # daemon sends them at the same version, 6: at another (its 6): nothing is applied
    # again, and rank 1 acknowledges them then, at the step they were applied.
    assert [lr_at[s] for s in (5, 8, 9, 12)] == [0.003, 0.003, 0.005, 0.005]
    assert applied_at == [3, 5, 9]
    assert r0["acked"] == [[1, 0, None], [2, 3, None], [3, 5, None], [4, 9, None]]
    # 7: the same values again under a new version (a daemon restarted without its state
    # dir): no value changes, so apply is False on every rank alike, and rank 1
    # acknowledges the new version at the step those values were applied, as a single
    # process does (it said the call that took it: status moved the change later).
    # Until its daemon sends rank 0's values (3, 5), rank 1 says it runs them in place
    # of its daemon's, once per state of its daemon (its 3 and 4).
    by_rank_0 = {"rank": 0, "revision": 100}
    assert r1["acked"] == [
        [1, 0, None],
        [2, 3, None],
        [3, 5, by_rank_0],
        [3, 5, None],
        [4, 9, by_rank_0],
        [6, 9, None],
        [20, 9, None],
    ]
    assert r1["versions"][-1] == 20  # its own daemon's numbering, once acknowledged
    assert r0["versions"][-1] == 4
    # Only the real disagreements (3 and 5) are warned of, on the rank that lost.
    assert r0["warned"] == []
    assert len(r1["warned"]) == 2
    assert all(w.startswith("live_ranks_disagree revision=100") for w in r1["warned"])


@contextmanager
def layered_ranks(
    etcd: EtcdServer, tmp_path: Path
) -> Iterator[tuple[DaemonProcess, DaemonProcess, list[subprocess.Popen[bytes]]]]:
    """Two nodes whose local layers differ (node A's daemon sets momentum 0.5, node B's
    does not), lr 0.5 in etcd, and one ``layers`` rank on each, ready: the two daemons and
    the ranks. On the way out the ranks are told to stop (a node stopped with SIGSTOP is
    resumed first) and waited for, and the daemons stopped; each rank's results are then
    in ``layers-RANK.json``."""
    etcd.etcdctl("put", P + "train/lr", "0.5")
    node_a = DaemonProcess(
        tmp_path / "a",
        endpoints=etcd.endpoint,
        extra=["--node", "nA", "--set", "train.momentum=0.5"],
    )
    node_b = DaemonProcess(tmp_path / "b", endpoints=etcd.endpoint, extra=["--node", "nB"])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank, node in enumerate((node_a.start(), node_b.start())):
            (tmp_path / f"layers-socket-{rank}").write_text(str(node.socket_path))
        procs += _start_ranks("layers", tmp_path)
        ready = [tmp_path / f"layers-ready-{r}" for r in range(2)]
        wait_for(lambda: all(p.exists() for p in ready), 45, "ranks ready", procs)
        yield node_a, node_b, procs
    finally:
        for node in (node_a, node_b):
            if node.proc is not None and node.proc.poll() is None:
                node.signal(signal.SIGCONT)
        (tmp_path / "stop").touch()
        _reap(procs)
        node_a.stop()
        node_b.stop()


def test_a_rank_that_runs_another_rank_s_values_is_shown_so_and_counted_by_set_wait(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The nodes' local layers differ (node A's daemon sets momentum): both ranks run rank
    0's values, and rank 1 never acknowledges them, its daemon's being others. ``set
    --wait`` called rank 1 a hung process (or, right after connect, ignored it), and
    ``status`` showed it pending, without its rank; it runs the change like rank 0."""
    with layered_ranks(etcd, tmp_path) as (_, _, procs):
        done = run_cli(
            "set", "--app", APP, "--etcd-endpoints", etcd.endpoint, "train.lr=0.3", "--wait", "15"
        )
        said = done.stdout + done.stderr
        assert done.returncode == 0, said
        assert "applied by all 2 processes" in said, said
        assert "runs the values agreed with rank 0 (its daemon's differ" in said, said
        (rank1,) = [e for e in status_entries(etcd) if e.get("rank") == 1]
        assert rank1["agreed"]["rank"] == 0 and "pending" not in rank1, rank1
        shown = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint)
        (row,) = [line for line in shown.stdout.splitlines() if "-rank1" in line]
        assert "(rank 1)" in row and "runs the values agreed with rank 0" in row, shown.stdout
    for r, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"layers-{r}.log").read_text()
    r0, r1 = [json.loads((tmp_path / f"layers-{r}.json").read_text()) for r in range(2)]
    assert r0["changes"] == r1["changes"]  # the same values, at the same steps
    assert r0["changes"][0][1:] == [0.5, 0.5] and r0["changes"][-1][1:] == [0.3, 0.5]


if __name__ == "__main__":
    if sys.argv[1] == "protocol":
        protocol_worker(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1] == "tie":
        tie_worker(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1] == "layers":
        layers_worker(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1] == "absent":
        absent_worker(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1] == "subgroup":
        subgroup_worker(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1] == "restart_only":
        restart_only_worker(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    else:
        worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
