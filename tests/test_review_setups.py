"""The optimizer binding under training setups beyond the plain loop, on CPU with real
torch: stochastic weight averaging's ``SWALR``, alone and after a main schedule in
``SequentialLR``; and hand-written loops that switch from one schedule to another made
at the start (a warmup, then the main schedule; the main one, then ``SWALR``), binding
again at the switch as docs/schedulers.md says."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch.optim import lr_scheduler as lrs
from torch.optim import swa_utils

from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.optim import OptimizerBinding

from .daemon_stub import DaemonStub
from .test_optim_binding import _lrs, _set

pytestmark = pytest.mark.timeout(60)


def _two_groups(base: float) -> tuple[torch.nn.Linear, torch.optim.SGD]:
    """A body and a head at a 10:1 ratio."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    groups = [{"params": [model.weight]}, {"params": [model.bias], "lr": base / 10}]
    return model, torch.optim.SGD(groups, lr=base, momentum=0.9)


def _step(model: torch.nn.Linear, opt: torch.optim.Optimizer, sched: lrs.LRScheduler) -> None:
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR passes SWALR an epoch: deprecated
        sched.step()


def _swa_run(
    base: float, swa_lr: float, change: tuple[int, float] | None, *, sequential: bool
) -> list[list[float]]:
    """The groups' lrs after each of 10 steps, under SWALR (after 4 cosine steps with
    ``sequential``), with the live lr set to ``change[1]`` before step ``change[0]``."""
    model, opt = _two_groups(base)
    swa = swa_utils.SWALR(opt, swa_lr=[swa_lr, swa_lr / 10], anneal_epochs=2)
    sched: lrs.LRScheduler = swa
    if sequential:
        main = lrs.CosineAnnealingLR(opt, T_max=6)
        sched = lrs.SequentialLR(opt, [main, swa], milestones=[4])
    binding = OptimizerBinding(opt, sched)
    seen = []
    for i in range(10):
        if change is not None and i == change[0]:
            _set(binding, lr=change[1])
            assert sched.get_last_lr() == _lrs(opt)
        _step(model, opt, sched)
        seen.append(_lrs(opt))
    return seen


def _assert_same_from(step: int, run: list[list[float]], reference: list[list[float]]) -> None:
    for got, want in zip(run[step:], reference[step:], strict=True):
        assert all(math.isclose(g, w, rel_tol=1e-9) for g, w in zip(got, want, strict=True)), (
            run,
            reference,
        )


@pytest.mark.parametrize("change_at", [1, 5])
def test_a_live_lr_under_swalr_is_kept_not_annealed_away(change_at: int) -> None:
    # SWALR anneals each group to its ``swa_lr`` (kept in the group) and then holds it.
    # The binding left ``swa_lr`` alone: a live lr set once the annealing was done lasted
    # one step (0.05, then 0.05 again at once), one set during it was pulled back to the
    # old ``swa_lr``: acknowledged as applied, undone by the next step.
    run = _swa_run(0.1, 0.05, (change_at, 0.02), sequential=False)
    assert run[-1] == pytest.approx([0.01, 0.001])
    # As every lr the schedule holds is scaled with the base: a run started at base 0.02.
    _assert_same_from(change_at, run, _swa_run(0.02, 0.01, None, sequential=False))


@pytest.mark.parametrize("change_at", [2, 5, 8])
def test_a_live_lr_before_and_after_the_swa_switch_follows_the_rule(change_at: int) -> None:
    # The usual SWA loop: a main schedule, then SWALR from a milestone, in SequentialLR.
    # A change in the main phase used to end at the old swa_lr (0.05) once SWALR took
    # over, and one in the SWA phase was undone at its next step.
    run = _swa_run(0.1, 0.05, (change_at, 0.02), sequential=True)
    _assert_same_from(change_at, run, _swa_run(0.02, 0.01, None, sequential=True))


# --- a hand-written switch to a schedule made at the start -------------------------------


@pytest.fixture
def stub(sock_path: str) -> Iterator[DaemonStub]:
    with DaemonStub(sock_path, {"train": {"lr": 0.1}}) as s:
        yield s


def _push_and_apply(stub: DaemonStub, live: LiveConfig, lr: float, step: int) -> None:
    version = stub.push({"train": {"lr": lr}})
    stub.wait_for(lambda: live.pending_version == version)
    live.apply(step)


def _warmup_then_cosine(
    live: LiveConfig | None, base: float, stub: DaemonStub | None = None
) -> list[list[float]]:
    """The groups' lrs after each of 10 steps of a loop that makes both schedules at the
    start, steps a 4-step warmup, then the cosine, and binds again at the switch; with
    ``live``, the live lr goes to 0.02 before step 1."""
    model, opt = _two_groups(base)
    main = lrs.CosineAnnealingLR(opt, T_max=10)
    warmup = lrs.LinearLR(opt, start_factor=0.25, total_iters=4)
    if live is not None:
        live.bind_optimizer(opt, warmup)
    seen = []
    for i in range(10):
        if live is not None and stub is not None and i == 1:
            _push_and_apply(stub, live, 0.02, i)
        if live is not None and i == 4:
            live.bind_optimizer(opt, main)  # the way docs/schedulers.md gives
        _step(model, opt, warmup if i < 4 else main)
        seen.append(_lrs(opt))
    return seen


def test_a_main_schedule_made_at_the_start_and_bound_at_the_switch_keeps_the_live_base(
    stub: DaemonStub,
) -> None:
    # The cosine's base_lrs were still the code's 0.1 at the switch: the bind took the
    # live 0.02 for a change from 0.1 and scaled the lr, at 0.02 already, by 0.2 again
    # (0.0039 where a run started at 0.02 holds 0.0195).
    with LiveConfig.connect(stub.path, timeout=5) as live:
        run = _warmup_then_cosine(live, 0.1, stub)
    first_cosine_step = (1 + math.cos(math.pi / 10)) / 2
    assert run[4] == pytest.approx([0.02 * first_cosine_step, 0.002 * first_cosine_step])
    _assert_same_from(1, run, _warmup_then_cosine(None, 0.02))


def _swa_by_hand(base: float, change: float | None) -> list[list[float]]:
    """torch's SWA recipe: both schedules made at the start, the main one stepped for 4
    steps, SWALR after; the binding is made again with SWALR at the switch."""
    model, opt = _two_groups(base)
    main = lrs.StepLR(opt, step_size=2, gamma=0.5)
    swa = swa_utils.SWALR(opt, swa_lr=[base / 2, base / 20], anneal_epochs=2)
    binding = OptimizerBinding(opt, main)
    live = base
    seen = []
    for i in range(10):
        if change is not None and i == 1:
            live = change
            _set(binding, lr=live)
        if i == 4:
            binding = OptimizerBinding(opt, swa)
            _set(binding, lr=live)  # as bind_optimizer applies the value in force
        _step(model, opt, main if i < 4 else swa)
        seen.append(_lrs(opt))
    return seen


def test_swalr_made_at_the_start_and_bound_at_the_switch_anneals_from_the_live_lr() -> None:
    # SWALR's base_lrs were the code's 0.1: binding it at the switch scaled the lr by 0.2
    # a second time, and the annealing started from 0.001 instead of 0.005.
    run = _swa_by_hand(0.1, 0.02)
    _assert_same_from(1, run, _swa_by_hand(0.02, None))
