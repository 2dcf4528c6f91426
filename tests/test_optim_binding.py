"""OptimizerBinding against real torch optimizers and schedulers on CPU."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as lrs

from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.errors import InvalidValue
from hotknob.model_runtime.optim import OptimizerBinding

from .daemon_stub import DaemonStub

LR = "train.lr"
WD = "train.weight_decay"
MOM = "train.momentum"


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))


def _sgd(base: float, momentum: float = 0.9) -> torch.optim.SGD:
    """Two groups at a 10:1 ratio, as in a body / head split."""
    m = _model()
    groups: list[dict[str, Any]] = [
        {"params": m[0].parameters()},
        {"params": m[1].parameters(), "lr": base / 10},
    ]
    return torch.optim.SGD(groups, lr=base, momentum=momentum, weight_decay=0.01)


def _train_step(opt: torch.optim.Optimizer) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    loss = sum((p**2).sum() for p in params)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def _set(binding: OptimizerBinding, **kv: float) -> None:
    values = {f"train.{k}": v for k, v in kv.items()}
    binding.apply(values, values)


# --- no scheduler ------------------------------------------------------------------------


def test_lr_weight_decay_momentum_reach_every_group_and_ratio_is_kept() -> None:
    opt = _sgd(0.1)
    binding = OptimizerBinding(opt, lr=LR, weight_decay=WD, momentum=MOM)
    assert binding.ratios == pytest.approx((1.0, 0.1))

    _set(binding, lr=0.5, weight_decay=0.2, momentum=0.5)

    assert _lrs(opt) == pytest.approx([0.5, 0.05])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.2]
    assert [g["momentum"] for g in opt.param_groups] == [0.5, 0.5]
    _train_step(opt)  # the optimizer still steps with the written values
    assert binding.base_lr == 0.5


def test_first_bind_with_equal_values_changes_nothing() -> None:
    opt = _sgd(0.1)
    before = [dict(g) for g in opt.param_groups]
    binding = OptimizerBinding(opt)
    _set(binding, lr=0.1, weight_decay=0.01, momentum=0.9)
    assert [dict(g) for g in opt.param_groups] == before


def test_first_bind_with_the_value_in_force_keeps_every_group_bit_for_bit() -> None:
    # 0.001266 / 0.002286 * 0.002286 is 0.0012659999999999998: a ratio does not round-trip.
    m = _model()
    opt = torch.optim.SGD(
        [{"params": m[0].parameters(), "lr": 0.002286}, {"params": m[1].parameters()}],
        lr=0.001266,
    )
    binding = OptimizerBinding(opt)
    _set(binding, lr=0.002286)
    assert _lrs(opt) == [0.002286, 0.001266]
    _set(binding, lr=0.004)  # another value: the ratio applies as usual
    assert _lrs(opt) == pytest.approx([0.004, 0.004 * 0.001266 / 0.002286])


def test_a_frozen_group_stays_frozen_and_the_others_keep_their_ratio() -> None:
    m = _model()
    frozen = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(
        [
            {"params": frozen.parameters(), "lr": 0.0},
            {"params": m[0].parameters(), "lr": 1e-3},
            {"params": m[1].parameters(), "lr": 2e-3},
        ],
        lr=1e-3,
    )
    binding = OptimizerBinding(opt)
    assert binding.ratios == (0.0, 1.0, 2.0)
    assert binding.base_lr == 1e-3  # the first group whose base is not 0 is the reference
    _set(binding, lr=4e-3)
    assert _lrs(opt) == [0.0, 4e-3, 8e-3]
    assert OptimizerBinding(opt).ratios == (0.0, 1.0, 2.0)  # bound again: the same


def test_groups_all_at_zero_take_the_live_lr_and_the_schedule_follows_it() -> None:
    opt = _sgd(0.0)
    sched = lrs.LambdaLR(opt, lambda epoch: 0.5**epoch)
    binding = OptimizerBinding(opt, sched)
    assert binding.ratios == (1.0, 1.0)  # no base to take a ratio from
    _set(binding, lr=0.1)
    assert _lrs(opt) == [0.1, 0.1]
    assert sched.base_lrs == [0.1, 0.1]  # else the schedule would take it back to 0
    _train_step(opt)
    sched.step()
    assert _lrs(opt) == pytest.approx([0.05, 0.05])


def test_only_changed_keys_are_applied() -> None:
    opt = _sgd(0.1)
    binding = OptimizerBinding(opt)
    values = {LR: 0.3, WD: 0.5, MOM: 0.1}
    binding.apply(values, {LR: 0.3})
    assert _lrs(opt) == pytest.approx([0.3, 0.03])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.01]
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]


def test_key_bound_to_none_and_missing_values_are_ignored() -> None:
    opt = _sgd(0.1)
    binding = OptimizerBinding(opt, momentum=None)
    binding.apply({LR: 0.2, MOM: 0.1}, {LR: 0.2, MOM: 0.1, WD: 0.3})  # WD absent from values
    assert _lrs(opt) == pytest.approx([0.2, 0.02])
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.01]


def test_custom_key_names() -> None:
    opt = _sgd(0.1)
    binding = OptimizerBinding(opt, lr="opt.base_lr", weight_decay=None, momentum=None)
    binding.apply({"opt.base_lr": 0.4, LR: 9.0}, {"opt.base_lr": 0.4, LR: 9.0})
    assert _lrs(opt) == pytest.approx([0.4, 0.04])


def test_tensor_lr_is_filled_in_place() -> None:
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01), capturable=False)
    lr_tensor = opt.param_groups[0]["lr"]
    ptr = lr_tensor.data_ptr()
    binding = OptimizerBinding(opt)
    _set(binding, lr=0.002)
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert lr_tensor.data_ptr() == ptr
    assert float(lr_tensor) == pytest.approx(0.002)
    _train_step(opt)


def test_tensor_lr_with_scheduler_keeps_identity_and_last_lr_agrees() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=torch.tensor(0.1))
    sched = lrs.StepLR(opt, step_size=2, gamma=0.5)
    lr_tensor = opt.param_groups[0]["lr"]
    binding = OptimizerBinding(opt, sched)
    _train_step(opt)
    sched.step()
    _set(binding, lr=0.01)
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(0.01)
    assert float(sched.get_last_lr()[0]) == pytest.approx(float(lr_tensor))


def test_adam_momentum_sets_beta1_and_keeps_beta2() -> None:
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    binding = OptimizerBinding(opt)
    _set(binding, momentum=0.8, weight_decay=0.05)
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    assert opt.param_groups[0]["weight_decay"] == 0.05
    assert "momentum" not in opt.param_groups[0]
    _train_step(opt)


def test_keys_a_group_lacks_are_not_added() -> None:
    m = _model()
    opt = torch.optim.Adagrad(m.parameters(), lr=0.1)  # no momentum, no betas
    binding = OptimizerBinding(opt)
    _set(binding, momentum=0.5)
    assert "momentum" not in opt.param_groups[0]
    assert "betas" not in opt.param_groups[0]


def test_invalid_values_raise_and_change_nothing() -> None:
    opt = _sgd(0.1)
    binding = OptimizerBinding(opt)
    before = [dict(g) for g in opt.param_groups]
    for bad in ({LR: 0.0}, {LR: -1.0}, {LR: math.nan}, {LR: "fast"}, {LR: 10**400}, {MOM: 1.0}):
        with pytest.raises(InvalidValue):
            binding.apply(bad, bad)
    with pytest.raises(InvalidValue):
        binding.apply({WD: -0.1}, {WD: -0.1})
    assert [dict(g) for g in opt.param_groups] == before


def test_an_invalid_key_leaves_its_settings_and_the_valid_keys_are_applied() -> None:
    opt = _sgd(0.1)
    binding = OptimizerBinding(opt)
    values = {LR: -1.0, WD: 0.05, MOM: 0.5}
    with pytest.raises(InvalidValue, match=r"^train\.lr: learning rate"):
        binding.apply(values, values)
    assert _lrs(opt) == [0.1, 0.01]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.05]
    assert [g["momentum"] for g in opt.param_groups] == [0.5, 0.5]

    values = {LR: 0.2, WD: -1.0, MOM: 2.0}
    with pytest.raises(InvalidValue) as raised:
        binding.apply(values, values)
    assert WD in str(raised.value) and MOM in str(raised.value)  # every invalid key named
    assert _lrs(opt) == pytest.approx([0.2, 0.02])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.05]
    assert [g["momentum"] for g in opt.param_groups] == [0.5, 0.5]


def test_param_group_added_after_bind_is_refused() -> None:
    opt = _sgd(0.1)
    binding = OptimizerBinding(opt)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5})
    with pytest.raises(InvalidValue, match="bind it again"):
        _set(binding, lr=0.2)
    assert _lrs(opt) == pytest.approx([0.1, 0.01, 0.5])


def test_lr_refused_for_added_groups_does_not_block_momentum() -> None:
    opt = _sgd(0.1)
    binding = OptimizerBinding(opt)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5})
    with pytest.raises(InvalidValue) as raised:
        _set(binding, lr=0.2, weight_decay=0.3, momentum=0.5)
    # lr and weight decay have no ratio for the new group; momentum needs none
    assert f"{LR}: the optimizer's param groups changed" in str(raised.value)
    assert f"{WD}: the optimizer's param groups changed" in str(raised.value)
    assert _lrs(opt) == pytest.approx([0.1, 0.01, 0.5])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.01, 0.01]
    assert [g["momentum"] for g in opt.param_groups] == [0.5, 0.5, 0.5]


def test_one_cycle_param_group_added_after_bind_is_refused() -> None:
    opt = _sgd(1.0)
    sched = lrs.OneCycleLR(opt, max_lr=[1.0, 0.1], total_steps=20)
    binding = OptimizerBinding(opt, sched)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5})
    before = _lrs(opt)
    with pytest.raises(InvalidValue, match="bind it again"):
        _set(binding, lr=0.2)
    assert _lrs(opt) == before


def test_binding_state_round_trip() -> None:
    opt = _sgd(0.1)
    binding = OptimizerBinding(opt)
    _set(binding, lr=0.3)
    state = binding.state_dict()
    other = OptimizerBinding(_sgd(0.2))
    other.load_state_dict(state)
    assert other.ratios == binding.ratios
    assert other.base_lr == pytest.approx(0.3)
    with pytest.raises(InvalidValue):
        OptimizerBinding(torch.optim.SGD(_model().parameters(), lr=0.1)).load_state_dict(state)


# --- schedulers --------------------------------------------------------------------------

SchedulerFactory = Callable[[torch.optim.Optimizer, float], Any]

SCHEDULERS: dict[str, SchedulerFactory] = {
    "StepLR": lambda o, b: lrs.StepLR(o, step_size=3, gamma=0.5),
    "ExponentialLR": lambda o, b: lrs.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o, b: lrs.CosineAnnealingLR(o, T_max=10),
    "CosineAnnealingLR-eta_min": lambda o, b: lrs.CosineAnnealingLR(o, T_max=10, eta_min=1e-3),
    "LambdaLR": lambda o, b: lrs.LambdaLR(o, lambda e: 0.9**e),
    "PolynomialLR": lambda o, b: lrs.PolynomialLR(o, total_iters=12, power=2.0),
    "OneCycleLR": lambda o, b: lrs.OneCycleLR(o, max_lr=[b, b / 10], total_steps=20),
    "CyclicLR": lambda o, b: lrs.CyclicLR(
        o, base_lr=[b, b / 10], max_lr=[2 * b, b / 5], step_size_up=3
    ),
    "CosineAnnealingWarmRestarts": lambda o, b: lrs.CosineAnnealingWarmRestarts(
        o, T_0=4, eta_min=1e-3
    ),
    "SequentialLR": lambda o, b: lrs.SequentialLR(
        o,
        [lrs.LinearLR(o, 0.1, total_iters=3), lrs.CosineAnnealingLR(o, T_max=10, eta_min=1e-3)],
        milestones=[3],
    ),
    "ChainedScheduler": lambda o, b: lrs.ChainedScheduler(
        [lrs.ExponentialLR(o, gamma=0.9), lrs.StepLR(o, step_size=3, gamma=0.5)]
    ),
}
NO_FLOOR = {"CosineAnnealingLR-eta_min", "CosineAnnealingWarmRestarts", "SequentialLR"}


def _assert_last_lr_agrees(sched: Any, opt: torch.optim.Optimizer) -> None:
    assert [float(x) for x in sched.get_last_lr()] == _lrs(opt)


def _run(name: str, base: float, steps: int, change_at: int | None) -> list[list[float]]:
    """Step a fresh optimizer + scheduler; at ``change_at`` set the live base to base * 0.1."""
    opt = _sgd(base)
    sched = SCHEDULERS[name](opt, base)
    binding = OptimizerBinding(opt, sched)
    _set(binding, lr=base)  # the first bind: values equal to what is configured
    seen = []
    for t in range(steps):
        if t == change_at:
            before = _lrs(opt)
            _set(binding, lr=base * 0.1)
            if name not in NO_FLOOR:
                assert _lrs(opt) == pytest.approx([x * 0.1 for x in before], rel=1e-12)
            _assert_last_lr_agrees(sched, opt)
            again = _lrs(opt), [list(map(float, sched.get_last_lr()))]
            _set(binding, lr=base * 0.1)  # the same value twice: a no-op
            assert (_lrs(opt), [list(map(float, sched.get_last_lr()))]) == again
        seen.append(_lrs(opt))
        _train_step(opt)
        sched.step()
        _assert_last_lr_agrees(sched, opt)
    return seen


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("change_at", [1, 4, 7])
def test_live_base_change_is_reshaped_by_the_schedule(name: str, change_at: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        live = _run(name, 1.0, 15, change_at)
        reference = _run(name, 0.1, 15, None)
        original = _run(name, 1.0, 15, None)
    assert live[:change_at] == original[:change_at]
    for t in range(change_at, 15):
        assert live[t] == pytest.approx(reference[t], rel=1e-9, abs=1e-12), f"step {t}"


def test_one_cycle_group_keys_and_base_lrs_are_scaled() -> None:
    opt = _sgd(1.0)
    sched = lrs.OneCycleLR(opt, max_lr=[1.0, 0.1], total_steps=20)
    binding = OptimizerBinding(opt, sched)
    keys = ("initial_lr", "max_lr", "min_lr")
    before = [g[k] for g in opt.param_groups for k in keys]
    base_lrs = list(sched.base_lrs)
    for _ in range(3):
        _train_step(opt)
        sched.step()
    _set(binding, lr=0.5)
    after = [g[k] for g in opt.param_groups for k in keys]
    assert after == pytest.approx([v * 0.5 for v in before])
    assert sched.base_lrs == pytest.approx([b * 0.5 for b in base_lrs])
    assert binding.base_lr == 0.5


def test_lambda_lr_base_lrs_and_initial_lr_are_rebased() -> None:
    opt = _sgd(1.0)
    sched = lrs.LambdaLR(opt, lambda e: 1.0 / (1 + e))
    binding = OptimizerBinding(opt, sched)
    _set(binding, lr=0.2)
    assert sched.base_lrs == pytest.approx([0.2, 0.02])
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.02])


def _plateau_run(change_at: int | None, metrics: list[float]) -> list[list[float]]:
    opt = _sgd(1.0)
    sched = lrs.ReduceLROnPlateau(opt, factor=0.5, patience=1, min_lr=[1e-3, 1e-4])
    binding = OptimizerBinding(opt, sched)
    seen = []
    for t, metric in enumerate(metrics):
        if t == change_at:
            before = _lrs(opt)
            _set(binding, lr=0.1)
            assert _lrs(opt) == pytest.approx([x * 0.1 for x in before])
            assert sched.min_lrs == pytest.approx([1e-4, 1e-5])
            _assert_last_lr_agrees(sched, opt)
        seen.append(_lrs(opt))
        _train_step(opt)
        sched.step(metric)
        _assert_last_lr_agrees(sched, opt)
    return seen


def test_reduce_on_plateau_scales_current_lr_and_later_cuts_multiply_it() -> None:
    metrics = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8]
    original = _plateau_run(None, metrics)
    live = _plateau_run(5, metrics)
    assert original[5] == pytest.approx([0.5, 0.05])  # one cut before the change
    assert live[5] == pytest.approx([0.05, 0.005])
    assert original[9] == pytest.approx([0.125, 0.0125])  # two later cuts ...
    assert live[9] == pytest.approx([0.0125, 0.00125])  # ... multiply the new value
    for t in range(5, len(metrics)):
        assert live[t] == pytest.approx([x * 0.1 for x in original[t]])


def test_unknown_scheduler_falls_back_to_rebase() -> None:
    class Halving(lrs.LRScheduler):
        def get_lr(self) -> list[float | torch.Tensor]:
            return [b * 0.5 ** (self.last_epoch // 2) for b in self.base_lrs]

    opt = _sgd(1.0)
    sched = Halving(opt)
    binding = OptimizerBinding(opt, sched)
    for _ in range(3):
        _train_step(opt)
        sched.step()
    assert _lrs(opt) == pytest.approx([0.5, 0.05])
    _set(binding, lr=0.1)
    assert _lrs(opt) == pytest.approx([0.05, 0.005])
    assert sched.base_lrs == pytest.approx([0.1, 0.01])
    _assert_last_lr_agrees(sched, opt)
    _train_step(opt)
    sched.step()
    assert _lrs(opt) == pytest.approx([0.025, 0.0025])


def test_resume_binding_first_then_loading_keeps_the_plateau_cuts() -> None:
    """The order ``docs/schedulers.md`` gives for a resume: bind, then load the optimizer's,
    the scheduler's and the binding's state (``LiveConfig.load_state_dict``)."""
    opt = _sgd(1e-2)
    sched = lrs.ReduceLROnPlateau(opt, factor=0.1, patience=0)
    binding = OptimizerBinding(opt, sched)
    for loss in (1.0, 2.0, 3.0):
        sched.step(loss)
    assert _lrs(opt) == pytest.approx([1e-4, 1e-5])  # two cuts
    saved = {"opt": opt.state_dict(), "sched": sched.state_dict(), "bind": binding.state_dict()}

    opt2 = _sgd(1e-2)
    sched2 = lrs.ReduceLROnPlateau(opt2, factor=0.1, patience=0)
    binding2 = OptimizerBinding(opt2, sched2)
    _set(binding2, lr=1e-2)  # what ``bind_optimizer`` does with the live value
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    binding2.load_state_dict(saved["bind"])
    assert _lrs(opt2) == pytest.approx([1e-4, 1e-5])
    _set(binding2, lr=5e-3)  # a live change after the resume scales what the cuts left
    assert _lrs(opt2) == pytest.approx([5e-5, 5e-6])


# --- weight decay and momentum per group -------------------------------------------------


def _adamw_decay_and_no_decay(wd: float = 0.1) -> torch.optim.AdamW:
    """The usual split: weights decay, biases (and norms) do not."""
    m = _model()
    decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in m.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
    )


def _wds(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["weight_decay"]) for g in opt.param_groups]


def test_a_no_decay_group_stays_at_zero() -> None:
    opt = _adamw_decay_and_no_decay(0.1)
    binding = OptimizerBinding(opt)
    assert binding.weight_decay_ratios == (1.0, 0.0)
    _set(binding, weight_decay=0.1)  # the value in force, as at bind
    assert _wds(opt) == [0.1, 0.0]
    _set(binding, weight_decay=0.05)
    assert _wds(opt) == [0.05, 0.0]
    _train_step(opt)


def test_weight_decay_keeps_group_ratios_and_the_value_in_force_bit_for_bit() -> None:
    m = _model()
    frozen = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(
        [
            {"params": frozen.parameters(), "weight_decay": 0.0},
            {"params": m[0].parameters(), "weight_decay": 0.002286},
            {"params": m[1].parameters(), "weight_decay": 0.001266},
        ],
        lr=0.1,
    )
    binding = OptimizerBinding(opt)
    _set(binding, weight_decay=0.002286)
    assert _wds(opt) == [0.0, 0.002286, 0.001266]  # not 0.0012659999999999998
    _set(binding, weight_decay=0.004)
    assert _wds(opt) == pytest.approx([0.0, 0.004, 0.004 * 0.001266 / 0.002286])


def test_groups_all_without_weight_decay_all_take_the_live_value() -> None:
    opt = _sgd(0.1)
    for group in opt.param_groups:
        group["weight_decay"] = 0.0
    binding = OptimizerBinding(opt)
    assert binding.weight_decay_ratios == (1.0, 1.0)
    _set(binding, weight_decay=0.03)
    assert _wds(opt) == [0.03, 0.03]


def test_weight_decay_ratios_are_checkpointed_and_old_states_still_load() -> None:
    binding = OptimizerBinding(_adamw_decay_and_no_decay(0.1))
    state = binding.state_dict()
    assert state["weight_decay_ratios"] == [1.0, 0.0]

    other_opt = _adamw_decay_and_no_decay(0.1)
    for group in other_opt.param_groups:
        group["weight_decay"] = 0.2  # bound while the groups were equal ...
    other = OptimizerBinding(other_opt)
    other.load_state_dict(state)  # ... the checkpoint's ratios win
    assert other.weight_decay_ratios == (1.0, 0.0)
    _set(other, weight_decay=0.05)
    assert _wds(other_opt) == [0.05, 0.0]

    old_format = {"ratios": state["ratios"], "own_bases": state["own_bases"]}
    again = OptimizerBinding(_adamw_decay_and_no_decay(0.1))
    again.load_state_dict(old_format)  # saved before weight-decay ratios were kept
    assert again.weight_decay_ratios == (1.0, 0.0)


def test_a_group_without_momentum_stays_at_zero() -> None:
    m = _model()
    sgd = torch.optim.SGD(
        [{"params": m[0].parameters(), "momentum": 0.9}, {"params": m[1].parameters()}],
        lr=0.1,
        momentum=0.0,
    )
    binding = OptimizerBinding(sgd)
    _set(binding, momentum=0.5)
    assert [g["momentum"] for g in sgd.param_groups] == [0.5, 0.0]

    adam = torch.optim.Adam(
        [{"params": m[0].parameters()}, {"params": m[1].parameters(), "betas": (0.0, 0.99)}],
        lr=1e-3,
        betas=(0.9, 0.999),
    )
    binding = OptimizerBinding(adam)
    _set(binding, momentum=0.8)
    assert [g["betas"] for g in adam.param_groups] == [(0.8, 0.999), (0.0, 0.99)]


def test_groups_all_without_momentum_all_take_the_live_value() -> None:
    opt = _sgd(0.1, momentum=0.0)
    binding = OptimizerBinding(opt)
    _set(binding, momentum=0.7)
    assert [g["momentum"] for g in opt.param_groups] == [0.7, 0.7]


@pytest.mark.parametrize("foreach", [False, True])
def test_rmsprop_momentum_from_zero_after_its_first_step(foreach: bool) -> None:
    m = _model()
    opt = torch.optim.RMSprop(m.parameters(), lr=1e-3, foreach=foreach)  # momentum 0
    binding = OptimizerBinding(opt)
    _train_step(opt)  # state made without a momentum buffer
    _set(binding, momentum=0.9)
    for p in m.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))
    _train_step(opt)
    assert all(opt.state[p]["momentum_buffer"].abs().sum() > 0 for p in m.parameters())


@pytest.fixture(scope="module")
def gloo_world_of_one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A torch.distributed group of this process alone: what ``ZeroRedundancyOptimizer``
    needs to be built."""
    import torch.distributed as dist

    rendezvous = tmp_path_factory.mktemp("gloo") / "rdzv"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["sgd", "rmsprop", "zero-sgd", "zero-rmsprop"])
def test_momentum_back_on_after_a_live_zero_starts_afresh(
    kind: str, request: pytest.FixtureRequest
) -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt: torch.optim.Optimizer
    rmsprop = kind.endswith("rmsprop")
    cls: type[torch.optim.Optimizer] = torch.optim.RMSprop if rmsprop else torch.optim.SGD
    lr = 0.1 if rmsprop else 1.0
    if kind.startswith("zero"):
        # Its state lives in an optimizer of its own (``.optim``), not shared with it.
        from torch.distributed.optim import ZeroRedundancyOptimizer

        request.getfixturevalue("gloo_world_of_one")
        opt = ZeroRedundancyOptimizer([p], optimizer_class=cls, lr=lr, momentum=0.9)
        state = opt.optim.state
    else:
        opt = cls([p], lr=lr, momentum=0.9)
        state = opt.state
    binding = OptimizerBinding(opt)

    def step(grad: float) -> float:
        before = p.item()
        opt.zero_grad()
        p.grad = torch.tensor([grad])
        opt.step()
        return p.item() - before

    for _ in range(5):
        step(1.0)  # a velocity against a gradient of +1
    _set(binding, momentum=0.0)
    for _ in range(20):
        step(-1.0)  # the buffer is not updated while momentum is 0
    _set(binding, momentum=0.9)
    if not rmsprop:
        assert "momentum_buffer" not in state[p]  # made from the gradient next step
        assert step(-1.0) == pytest.approx(1.0)  # lr * grad, as at a first step
    else:
        assert torch.equal(state[p]["momentum_buffer"], torch.zeros_like(p))
        assert step(-1.0) > 0  # the old buffer moved it by about -2
    # Between two values above 0 the buffer is kept.
    buffer = state[p]["momentum_buffer"].clone()
    _set(binding, momentum=0.5)
    assert torch.equal(state[p]["momentum_buffer"], buffer)


# --- a scheduler the binding was not given ----------------------------------------------


@pytest.mark.parametrize("made", ["before bind", "after bind"])
def test_a_scheduler_not_given_to_the_binding_refuses_lr(made: str) -> None:
    opt = _sgd(1.0)
    sched = lrs.LambdaLR(opt, lambda e: 0.9**e) if made == "before bind" else None
    binding = OptimizerBinding(opt)
    if sched is None:
        sched = lrs.LambdaLR(opt, lambda e: 0.9**e)
    _train_step(opt)
    sched.step()
    before = _lrs(opt)
    with pytest.raises(InvalidValue, match="pass it as scheduler= to bind_optimizer"):
        _set(binding, lr=0.1, weight_decay=0.2)
    assert _lrs(opt) == before
    assert _wds(opt) == [0.2, 0.2]  # the other keys still apply


# --- cosine: a group whose base is the floor ----------------------------------------------


def _cosine_run(
    kind: str, bases: list[float], steps: int, change: tuple[int, float] | None
) -> list[list[float]]:
    m = _model()
    groups = [{"params": p.parameters(), "lr": b} for p, b in zip(m, bases, strict=True)]
    opt = torch.optim.SGD(groups, lr=bases[0])
    sched: Any
    if kind == "CosineAnnealingLR":
        sched = lrs.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    else:
        sched = lrs.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2, eta_min=0.01)
    binding = OptimizerBinding(opt, sched)
    seen = []
    for t in range(steps):
        if change is not None and t == change[0]:
            _set(binding, lr=change[1])
        seen.append(_lrs(opt))
        _train_step(opt)
        sched.step()
    return seen


@pytest.mark.parametrize("kind", ["CosineAnnealingLR", "CosineAnnealingWarmRestarts"])
@pytest.mark.parametrize(
    ("bases", "new_base"),
    [
        ([0.1, 0.01], 0.01),  # the second group sits at eta_min; another group tells where
        ([0.01, 0.01], 0.1),  # every group at eta_min: the closed form tells where
    ],
)
def test_cosine_group_at_eta_min_follows_the_rule(
    kind: str, bases: list[float], new_base: float
) -> None:
    for at in (3, 6):
        live = _cosine_run(kind, bases, 12, (at, new_base))
        reference = _cosine_run(kind, [b * new_base / bases[0] for b in bases], 12, None)
        for t in range(at, 12):
            assert live[t] == pytest.approx(reference[t], rel=1e-9), f"change at {at}, step {t}"


# --- through LiveConfig -------------------------------------------------------------------


@pytest.fixture
def stub(sock_path: str) -> Iterator[DaemonStub]:
    with DaemonStub(sock_path, {"train": {"lr": 1.0, "weight_decay": 0.01, "momentum": 0.9}}) as s:
        yield s


@pytest.fixture
def live(stub: DaemonStub) -> Iterator[LiveConfig]:
    with LiveConfig.connect(stub.path, timeout=5) as client:
        yield client


def _push_and_apply(stub: DaemonStub, live: LiveConfig, lr: float, step: int) -> None:
    version = stub.push({"train": {"lr": lr, "weight_decay": 0.01, "momentum": 0.9}})
    stub.wait_for(lambda: live.pending_version == version)
    live.apply(step)


def test_binding_an_optimizer_again_replaces_its_binding(
    stub: DaemonStub, live: LiveConfig
) -> None:
    opt = _sgd(1.0)
    sched = lrs.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    first = live.bind_optimizer(opt, sched)
    second = live.bind_optimizer(opt, sched)
    assert first.removed and not second.removed
    assert len(live.state_dict()["bindings"]) == 1
    _push_and_apply(stub, live, 0.1, 1)
    assert _lrs(opt) == pytest.approx([0.1, 0.01])  # one change, not two
    first.remove()  # the replaced handle no longer touches the new binding
    _push_and_apply(stub, live, 0.05, 2)
    assert _lrs(opt) == pytest.approx([0.05, 0.005])


def test_a_refused_rebind_keeps_the_earlier_binding(stub: DaemonStub, live: LiveConfig) -> None:
    opt = _sgd(1.0)
    first = live.bind_optimizer(opt)
    lrs.StepLR(opt, step_size=3)  # a scheduler now, not given to the new binding
    with pytest.raises(InvalidValue, match="initial_lr"):
        live.bind_optimizer(opt)
    assert not first.removed
    assert len(live.state_dict()["bindings"]) == 1


def test_bind_refuses_an_optimizer_whose_scheduler_was_not_given(
    stub: DaemonStub, live: LiveConfig
) -> None:
    opt = _sgd(0.5)
    lrs.StepLR(opt, step_size=3)
    with pytest.raises(InvalidValue, match="initial_lr"):
        live.bind_optimizer(opt)
    assert live.state_dict()["bindings"] == []  # nothing left registered
    _push_and_apply(stub, live, 0.1, 1)
    assert _lrs(opt) == [0.5, 0.05]


class _Wrapper:
    """An optimizer wrapper of the common kind: it keeps the real one as ``optimizer`` and
    shares its param groups and state."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()


def test_a_wrapped_rmsprop_gets_its_momentum_buffers() -> None:
    m = _model()
    opt = torch.optim.RMSprop(m.parameters(), lr=1e-3)  # momentum 0
    binding = OptimizerBinding(_Wrapper(opt))  # type: ignore[arg-type]
    _train_step(opt)
    _set(binding, momentum=0.9)
    _train_step(opt)  # raised KeyError: 'momentum_buffer'
    assert all(opt.state[p]["momentum_buffer"].abs().sum() > 0 for p in m.parameters())


def test_binding_a_wrapper_of_a_bound_optimizer_replaces_that_binding(
    stub: DaemonStub, live: LiveConfig
) -> None:
    opt = _sgd(1.0)
    sched = lrs.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    first = live.bind_optimizer(opt, sched)
    live.bind_optimizer(_Wrapper(opt), sched)
    assert first.removed and len(live.state_dict()["bindings"]) == 1
    _push_and_apply(stub, live, 0.1, 1)
    assert _lrs(opt) == pytest.approx([0.1, 0.01])  # one change, not two


def test_bindings_for_other_keys_of_one_optimizer_are_kept(
    stub: DaemonStub, live: LiveConfig
) -> None:
    opt = _sgd(1.0)
    lr_only = live.bind_optimizer(opt, lr="train.lr", weight_decay=None, momentum=None)
    live.bind_optimizer(opt, lr=None, weight_decay="train.weight_decay", momentum=None)
    assert not lr_only.removed
    _push_and_apply(stub, live, 0.5, 1)
    assert _lrs(opt) == pytest.approx([0.5, 0.05])


def test_a_rebind_after_a_live_zero_keeps_the_no_decay_group(
    stub: DaemonStub, live: LiveConfig
) -> None:
    m = _model()
    groups: list[dict[str, Any]] = [
        {"params": m[0].parameters(), "weight_decay": 0.1},
        {"params": m[1].parameters(), "weight_decay": 0.0},  # biases and norms
    ]
    opt = torch.optim.AdamW(groups, lr=1.0)
    live.bind_optimizer(opt)
    version = stub.push({"train": {"lr": 1.0, "weight_decay": 0.0, "momentum": 0.9}})
    stub.wait_for(lambda: live.pending_version == version)
    live.apply(1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    live.bind_optimizer(opt)  # e.g. after add_param_group; every group is at 0 now
    version = stub.push({"train": {"lr": 1.0, "weight_decay": 0.05, "momentum": 0.9}})
    stub.wait_for(lambda: live.pending_version == version)
    live.apply(2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_a_rebind_after_a_live_zero_and_add_param_group_keeps_the_decay_and_momentum(
    stub: DaemonStub, live: LiveConfig
) -> None:
    m = _model()
    opt = torch.optim.AdamW(m[0].parameters(), lr=1.0, weight_decay=0.01, betas=(0.9, 0.999))
    live.bind_optimizer(opt)
    version = stub.push({"train": {"lr": 1.0, "weight_decay": 0.0, "momentum": 0.0}})
    stub.wait_for(lambda: live.pending_version == version)
    live.apply(1)
    opt.add_param_group({"params": m[1].parameters()})  # takes the defaults: 0.01 and 0.9
    live.bind_optimizer(opt)
    version = stub.push({"train": {"lr": 1.0, "weight_decay": 0.05, "momentum": 0.9}})
    stub.wait_for(lambda: live.pending_version == version)
    live.apply(2)
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.05, 0.05])
    assert [g["betas"][0] for g in opt.param_groups] == [0.9, 0.9]


def test_groups_added_during_a_live_zero_are_measured_against_the_value_before_it() -> None:
    m = _model()
    groups: list[dict[str, Any]] = [
        {"params": [m[0].weight], "weight_decay": 0.1, "momentum": 0.9},
        {"params": [m[0].bias], "weight_decay": 0.0, "momentum": 0.0},  # no decay, held
    ]
    opt = torch.optim.SGD(groups, lr=0.1)
    earlier = OptimizerBinding(opt)
    _set(earlier, weight_decay=0.2)  # ratio 1 stands for 0.2 now, not the 0.1 at bind
    _set(earlier, weight_decay=0.0, momentum=0.0)
    opt.add_param_group({"params": [m[1].weight], "weight_decay": 0.1, "momentum": 0.0})
    opt.add_param_group({"params": [m[1].bias], "weight_decay": 0.0, "momentum": 0.9})
    binding = OptimizerBinding(opt)
    binding.inherit(earlier)
    assert binding.weight_decay_ratios == pytest.approx((1.0, 0.0, 0.5, 0.0))
    _set(binding, weight_decay=0.4, momentum=0.8)
    assert _wds(opt) == pytest.approx([0.4, 0.0, 0.2, 0.0])
    # The third group is at 0 while the first (at 0 for the live 0 only) is not: held.
    assert [g["momentum"] for g in opt.param_groups] == [0.8, 0.0, 0.0, 0.8]


def test_a_rebind_under_reduce_on_plateau_keeps_its_cuts(
    stub: DaemonStub, live: LiveConfig
) -> None:
    opt = _sgd(1.0)
    sched = lrs.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    live.bind_optimizer(opt, sched)
    for loss in (1.0, 2.0, 3.0):
        sched.step(loss)
    assert _lrs(opt) == pytest.approx([0.25, 0.025])  # two cuts
    extra = torch.nn.Linear(1, 1)
    opt.add_param_group({"params": extra.parameters(), "lr": 0.0025})  # base 0.01 at this cut
    live.bind_optimizer(opt, sched)  # the live lr is still 1.0
    assert _lrs(opt) == pytest.approx([0.25, 0.025, 0.0025])
    _push_and_apply(stub, live, 0.5, 1)
    assert _lrs(opt) == pytest.approx([0.125, 0.0125, 0.00125])


def test_a_refused_bind_writes_nothing(stub: DaemonStub, live: LiveConfig) -> None:
    opt = _sgd(0.5, momentum=0.3)
    lrs.StepLR(opt, step_size=3)  # a scheduler not given to the binding
    before = [dict(g, params=None) for g in opt.param_groups]
    with pytest.raises(InvalidValue, match="initial_lr"):
        live.bind_optimizer(opt)
    assert [dict(g, params=None) for g in opt.param_groups] == before


# --- checkpointed binding states go back to the binding that saved them -------------------


def _two_group_sgd(head_ratio: float) -> torch.optim.SGD:
    """A Linear's weight and bias in two groups, the bias's lr ``head_ratio`` times the
    weight's."""
    layer = torch.nn.Linear(2, 2)
    groups: list[dict[str, Any]] = [
        {"params": [layer.weight], "lr": 0.1},
        {"params": [layer.bias], "lr": 0.1 * head_ratio},
    ]
    return torch.optim.SGD(groups, lr=0.1)


def _lr_only(live: LiveConfig, opt: torch.optim.Optimizer) -> Any:
    return live.bind_optimizer(opt, weight_decay=None, momentum=None)


def test_a_rebind_keeps_its_place_for_the_checkpoint(stub: DaemonStub) -> None:
    # Bind A, bind B, then bind A again (as after add_param_group): the new binding of A
    # takes the old one's place, so a resumed run that binds A then B gets each its own.
    version = stub.push({"train": {"lr": 0.1}})
    with LiveConfig.connect(stub.path, timeout=5) as live:
        stub.wait_for(lambda: live.version == version)
        a, b = _two_group_sgd(0.1), _two_group_sgd(2.0)
        _lr_only(live, a)
        _lr_only(live, b)
        _lr_only(live, a)
        saved = live.state_dict()
    assert [s["ratios"] for s in saved["bindings"]] == [
        pytest.approx([1.0, 0.1]),
        pytest.approx([1.0, 2.0]),
    ]
    with LiveConfig.connect(stub.path, timeout=5) as live:
        a, b = _two_group_sgd(0.1), _two_group_sgd(2.0)
        _lr_only(live, a)
        _lr_only(live, b)
        live.load_state_dict(saved)
        version = stub.push({"train": {"lr": 1.0}})
        stub.wait_for(lambda: live.pending_version == version)
        live.apply(1)
        assert _lrs(a) == pytest.approx([1.0, 0.1])
        assert _lrs(b) == pytest.approx([1.0, 2.0])


def test_a_binding_state_saved_for_other_keys_or_groups_is_refused_and_nothing_changes(
    stub: DaemonStub, live: LiveConfig
) -> None:
    a = _two_group_sgd(0.1)
    b = torch.optim.SGD(
        [{"params": list(torch.nn.Linear(2, 2).parameters()), "lr": 0.1},
         {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.3}],
        lr=0.1,
    )  # fmt: skip
    _lr_only(live, a)
    _lr_only(live, b)
    saved = live.state_dict()
    with LiveConfig.connect(stub.path, timeout=5) as resumed:
        first = _lr_only(resumed, _two_group_sgd(0.5))
        second = _lr_only(resumed, _two_group_sgd(0.5))  # not b: groups of 1 and 1 params
        before = resumed.state_dict()["bindings"]
        with pytest.raises(ValueError, match=r"binding state 1 .*param groups of \[2, 1\]"):
            resumed.load_state_dict(saved)
        assert resumed.state_dict()["bindings"] == before  # the first got its own back
        assert not first.removed and not second.removed
    with LiveConfig.connect(stub.path, timeout=5) as resumed:
        resumed.bind_optimizer(_two_group_sgd(0.5), weight_decay=None)  # lr and momentum
        _lr_only(resumed, b)
        with pytest.raises(ValueError, match=r"binding state 0 .*for the keys"):
            resumed.load_state_dict(saved)


def test_binding_states_saved_without_keys_and_group_sizes_still_load(
    stub: DaemonStub, live: LiveConfig
) -> None:
    _lr_only(live, _two_group_sgd(0.1))
    saved = live.state_dict()
    for state in saved["bindings"]:
        del state["keys"], state["group_sizes"]  # as saved before they were kept
    with LiveConfig.connect(stub.path, timeout=5) as resumed:
        opt = _two_group_sgd(0.5)
        _lr_only(resumed, opt)
        resumed.load_state_dict(saved)
        version = stub.push({"train": {"lr": 0.3}})
        stub.wait_for(lambda: resumed.pending_version == version)
        resumed.apply(1)
        assert _lrs(opt) == pytest.approx([0.3, 0.03])


# --- a scheduler made after the bind ------------------------------------------------------


@pytest.mark.parametrize("materialised", [False, True])
def test_a_scheduler_made_after_the_bind_refuses_a_live_lr_until_bound_with_it(
    materialised: bool,
) -> None:
    # A hand-written loop: a warmup given to the binding, then a main schedule made
    # after it. Its next step would undo a live change: refused until bound with it.
    opt = torch.optim.SGD(_model().parameters(), lr=1.0)
    warm = lrs.LinearLR(opt, 0.1, total_iters=2)
    binding = OptimizerBinding(opt, warm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            _train_step(opt)
            warm.step()
        main = lrs.LambdaLR(opt, lambda e: 0.9**e)
        _train_step(opt)
        main.step()
        if materialised:  # a checkpoint: the schedulers' __dict__ now refer to opt
            warm.state_dict()
            main.state_dict()
        before = _lrs(opt)
        with pytest.raises(
            InvalidValue, match=r"LambdaLR.*pass it as scheduler= to bind_optimizer"
        ):
            _set(binding, lr=0.1, momentum=0.5)
        assert _lrs(opt) == before
        assert opt.param_groups[0]["momentum"] == 0.5  # the other keys still apply
        # The way out: bind again with it. The warmup, idle since, is no obstacle.
        binding = OptimizerBinding(opt, main)
        _set(binding, lr=0.1)
        _train_step(opt)
        main.step()
        assert _lrs(opt) == pytest.approx([0.1 * 0.9**2])
        # The warmup stepped again: it drives the optimizer too, and is refused.
        warm.step()
        with pytest.raises(InvalidValue, match="LinearLR"):
            _set(binding, lr=0.2)
