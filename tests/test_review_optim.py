"""OptimizerBinding reviewed by real training loops on CPU: groups added after a
scheduler was made, and live values too large for what the binding derives from them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as lrs

from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.errors import InvalidValue
from hotknob.model_runtime.optim import OptimizerBinding

from .daemon_stub import DaemonStub
from .test_optim_binding import _lrs, _model, _set, _sgd, _train_step

Schedule = Callable[[torch.optim.Optimizer], Any]

# torch's recursive schedulers, which step a param group added after they were made
RECURSIVE: dict[str, Schedule] = {
    "StepLR": lambda o: lrs.StepLR(o, step_size=2, gamma=0.5),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.8),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
}


def _values(lr: float, weight_decay: float = 0.0) -> dict[str, Any]:
    return {"train": {"lr": lr, "weight_decay": weight_decay, "momentum": 0.9}}


@pytest.fixture
def stub(sock_path: str) -> Iterator[DaemonStub]:
    with DaemonStub(sock_path, _values(1.0)) as s:
        yield s


@pytest.fixture
def live(stub: DaemonStub) -> Iterator[LiveConfig]:
    with LiveConfig.connect(stub.path, timeout=5) as client:
        yield client


def _push(stub: DaemonStub, live: LiveConfig, lr: float, step: int) -> None:
    version = stub.push(_values(lr))
    stub.wait_for(lambda: live.pending_version == version)
    live.apply(step)


def _unfreezing_run(
    schedule: Schedule, base: float, live: LiveConfig | None = None, stub: DaemonStub | None = None
) -> list[list[float]]:
    """Progressive unfreezing: a second layer's params join at step 3 (lr base / 20), and
    the optimizer is bound again, as the docs say; with ``live``, the live lr halves the
    base at step 5."""
    m = _model()
    opt = torch.optim.SGD(m[0].parameters(), lr=base, momentum=0.9)
    sched = schedule(opt)
    if live is not None:
        live.bind_optimizer(opt, sched)
    seen = []
    for t in range(10):
        if t == 3:
            opt.add_param_group({"params": m[1].parameters(), "lr": base / 20})
            if live is not None:
                before = _lrs(opt)
                live.bind_optimizer(opt, sched)
                assert _lrs(opt) == before  # the bind itself changes no lr
        if t == 5 and live is not None and stub is not None:
            _push(stub, live, base / 2, t)
        seen.append(_lrs(opt))
        _train_step(opt)
        sched.step()
    return seen


@pytest.mark.parametrize("name", sorted(RECURSIVE))
def test_a_rebind_after_add_param_group_keeps_the_schedule_and_a_live_lr_is_a_base(
    name: str, stub: DaemonStub, live: LiveConfig
) -> None:
    seen = _unfreezing_run(RECURSIVE[name], 1.0, live, stub)
    halved = _unfreezing_run(RECURSIVE[name], 0.5)  # a run started at the new base
    unchanged = _unfreezing_run(RECURSIVE[name], 1.0)
    assert seen[:5] == unchanged[:5]
    for t in range(5, 10):
        assert seen[t] == pytest.approx(halved[t], rel=1e-9), f"step {t}"


def test_a_resume_after_add_param_group_needs_no_rebind() -> None:
    """The first run added a group after its scheduler was made and bound again; the
    resumed run builds the optimizer with every group, binds, then loads."""
    m = _model()
    opt = torch.optim.SGD(m[0].parameters(), lr=1.0, momentum=0.9)
    sched = lrs.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        _train_step(opt)
        sched.step()
    opt.add_param_group({"params": m[1].parameters(), "lr": 0.05})
    binding = OptimizerBinding(opt, sched)
    _set(binding, lr=1.0)
    _set(binding, lr=0.4)
    saved = {"opt": opt.state_dict(), "sched": sched.state_dict(), "bind": binding.state_dict()}

    m2 = _model()
    groups: list[dict[str, Any]] = [
        {"params": m2[0].parameters()},
        {"params": m2[1].parameters(), "lr": 0.05},
    ]
    opt2 = torch.optim.SGD(groups, lr=1.0, momentum=0.9)
    sched2 = lrs.StepLR(opt2, step_size=2, gamma=0.5)
    binding2 = OptimizerBinding(opt2, sched2)
    _set(binding2, lr=0.4)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    binding2.load_state_dict(saved["bind"])
    assert _lrs(opt2) == _lrs(opt)
    for b, o, s in ((binding, opt, sched), (binding2, opt2, sched2)):
        _set(b, lr=0.2)
        _train_step(o)
        s.step()
    assert _lrs(opt2) == pytest.approx(_lrs(opt), rel=1e-12)
    assert _lrs(opt) == pytest.approx([0.05, 0.005])


def _one_cycle(opt: torch.optim.Optimizer) -> Any:
    return lrs.OneCycleLR(opt, max_lr=1e-3, total_steps=20)


def _cyclic(opt: torch.optim.Optimizer) -> Any:
    return lrs.CyclicLR(opt, base_lr=1e-3, max_lr=0.1, step_size_up=3)


@pytest.mark.parametrize(
    ("make", "lr"),
    [
        (lambda: (_sgd(0.1, momentum=0.0), None), 1e308),  # a group's ratio 10 overflows
        (lambda: (o := torch.optim.SGD(_model().parameters(), lr=1e-3), _one_cycle(o)), 1e308),
        (lambda: (o := torch.optim.SGD(_model().parameters(), lr=1e-3), _cyclic(o)), 1e307),
    ],
    ids=["group-ratio", "OneCycleLR", "CyclicLR"],
)
def test_an_lr_whose_derived_values_overflow_is_refused_and_changes_nothing(
    make: Callable[[], tuple[torch.optim.Optimizer, Any]], lr: float
) -> None:
    opt, sched = make()
    if sched is None:  # the second group at 10 times the first
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 0.01, 0.1
    binding = OptimizerBinding(opt, sched)
    _train_step(opt)
    if sched is not None:
        sched.step()
    groups = [dict(g, params=None) for g in opt.param_groups]
    bases = [list(getattr(sched, k, [])) for k in ("base_lrs", "max_lrs")]
    with pytest.raises(InvalidValue, match="too large"):
        _set(binding, lr=lr)
    assert [dict(g, params=None) for g in opt.param_groups] == groups
    assert [list(getattr(sched, k, [])) for k in ("base_lrs", "max_lrs")] == bases
    _set(binding, lr=5e-4)  # a later sane value applies as usual
    assert binding.base_lr == 5e-4


def test_a_weight_decay_whose_group_values_overflow_is_refused() -> None:
    m = _model()
    opt = torch.optim.AdamW(
        [
            {"params": m[0].parameters(), "weight_decay": 0.01},
            {"params": m[1].parameters(), "weight_decay": 0.1},
        ]
    )
    binding = OptimizerBinding(opt)
    with pytest.raises(InvalidValue, match=r"train\.weight_decay: .* too large"):
        _set(binding, weight_decay=1e308, lr=0.002)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.1]
    assert _lrs(opt) == [0.002, 0.002]  # the other key still applies
    _train_step(opt)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_a_bind_whose_lr_overflows_is_refused_and_writes_nothing(
    stub: DaemonStub, live: LiveConfig
) -> None:
    version = stub.push(_values(1e308, weight_decay=0.05))
    stub.wait_for(lambda: live.pending_version == version)
    live.apply(0)
    opt = _sgd(0.01, momentum=0.9)
    opt.param_groups[1]["lr"] = 0.1  # ratio 10
    before = [dict(g, params=None) for g in opt.param_groups]
    with pytest.raises(InvalidValue, match=r"train\.lr: .* too large"):
        live.bind_optimizer(opt)
    assert [dict(g, params=None) for g in opt.param_groups] == before
