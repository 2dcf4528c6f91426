"""The runtime inside training loops as users write them, on CPU with real torch: two
optimizers in one loop (a GAN's), and the smallest learning rates the schema allows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.optim import lr_scheduler as lrs

from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.errors import InvalidValue
from hotknob.model_runtime.optim import OptimizerBinding

from .daemon_stub import DaemonStub
from .test_optim_binding import _lrs, _set, _sgd, _train_step


@pytest.fixture
def stub(sock_path: str) -> Iterator[DaemonStub]:
    with DaemonStub(sock_path, {"train": {"lr": 2e-4, "momentum": 0.5}}) as s:
        yield s


def _gan() -> tuple[torch.optim.Adam, torch.optim.Adam, lrs.LambdaLR, lrs.LambdaLR]:
    torch.manual_seed(0)
    generator, discriminator = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=4e-4, betas=(0.5, 0.999))
    decay = lambda e: 1 - e / 100  # noqa: E731
    return opt_g, opt_d, lrs.LambdaLR(opt_g, decay), lrs.LambdaLR(opt_d, decay)


def test_a_scheduler_of_another_optimizer_is_refused_at_bind(stub: DaemonStub) -> None:
    # A GAN loop with the two schedulers swapped by mistake. The binding took the other
    # optimizer's base_lrs for its own: the bind alone (the live lr is the generator's
    # own) set the generator's lr to 1e-4 and halved the discriminator's schedule.
    opt_g, opt_d, sched_g, sched_d = _gan()
    with LiveConfig.connect(stub.path, timeout=5) as live:
        with pytest.raises(InvalidValue, match="drives another optimizer"):
            live.bind_optimizer(opt_g, sched_d)
        assert _lrs(opt_g) == [2e-4] and _lrs(opt_d) == [4e-4]
        assert sched_d.base_lrs == [4e-4] and sched_g.base_lrs == [2e-4]
        assert live.state_dict()["bindings"] == []
        # Each with its own: a live lr is each generator's base, the schedule goes on.
        live.bind_optimizer(opt_g, sched_g)
        for _ in range(2):
            _train_step(opt_g)
            sched_g.step()
        version = stub.push({"train": {"lr": 1e-4, "momentum": 0.5}})
        stub.wait_for(lambda: live.pending_version == version)
        live.apply(2)
        assert _lrs(opt_g) == pytest.approx([1e-4 * 0.98])
        assert _lrs(opt_d) == [4e-4] and sched_d.base_lrs == [4e-4]


def test_an_lr_too_small_for_a_normal_base_is_refused_and_the_schedule_survives() -> None:
    # lr > 0 lets a subnormal value through. Applied, the head's base (ratio 0.1) became
    # 0 and StepLR's lr of the body 0 for good: back at 1.0 the body stayed at 0 and the
    # head jumped to its base, out of the schedule; 1e-310 then back to 1.0 was refused
    # as "1.0 is too large" (the factor from 1e-310 overflows).
    opt = _sgd(1.0)
    sched = lrs.StepLR(opt, step_size=2, gamma=0.5)
    binding = OptimizerBinding(opt, sched)
    for _ in range(3):
        _train_step(opt)
        sched.step()
    before = _lrs(opt)
    assert before == pytest.approx([0.5, 0.05])
    for tiny in (5e-324, 1e-310):
        with pytest.raises(InvalidValue, match="too small"):
            _set(binding, lr=tiny)
        assert _lrs(opt) == before and sched.base_lrs == pytest.approx([1.0, 0.1])
    _set(binding, lr=1e-300)  # small, but every base is still a normal float
    _set(binding, lr=0.2)
    assert _lrs(opt) == pytest.approx([0.1, 0.01])
    _train_step(opt)
    sched.step()
    assert _lrs(opt) == pytest.approx([0.05, 0.005])
