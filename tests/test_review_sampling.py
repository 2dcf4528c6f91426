"""A review of the live sampling settings by real generation loops: a tiny model's logits
drawn token by token with ``sample``, its settings changed through the module's API and
through a real daemon watching a config file."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.errors import InvalidValue
from hotknob.model_runtime.sampling import LiveSampling, SamplingParams, filter_logits, sample
from tests.daemon_proc import DaemonProcess

VOCAB = 11


class TinyLM(torch.nn.Module):
    """Next-token logits from the last token alone: enough to drive a generation loop."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    @torch.no_grad()
    def forward(self, last: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(last))


def test_numpy_scalars_are_numbers() -> None:
    """A sweep over ``np.arange`` or a value read from a numpy array is a number: it was
    refused as "expected a number, got np.int64(40)"."""
    np = pytest.importorskip("numpy")
    params = SamplingParams(top_k=np.int64(40), temperature=np.float32(0.5))
    assert (params.top_k, params.temperature) == (40, 0.5)
    assert type(params.top_k) is int and type(params.temperature) is float
    swept = [SamplingParams(top_k=k).top_k for k in np.arange(1, 4)]
    assert swept == [1, 2, 3]
    values = {"sampling": {"top_p": np.float32(0.5), "max_new_tokens": np.int32(8)}}
    assert SamplingParams.from_values(values) == SamplingParams(top_p=0.5, max_new_tokens=8)
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sample(logits, SamplingParams(top_k=np.int64(1))).tolist() == [1]
    for bad in ({"top_k": np.bool_(True)}, {"top_k": np.float32(2.5)}, {"top_p": np.nan}):
        with pytest.raises(InvalidValue):
            SamplingParams(**bad)


def _save(path: Path, text: str) -> None:
    staged = path.with_name("." + path.name)
    staged.write_text(text)
    os.replace(staged, path)


def _wait(predicate: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.timeout(90)
def test_a_daemon_change_reaches_the_sampler_at_a_token_and_a_refused_one_never(
    sock_path: str,
) -> None:
    work = Path(sock_path).parent
    config = work / "c.yaml"
    _save(config, "sampling:\n  temperature: 1.5\n  top_k: 4\n")
    model = TinyLM()
    tokens = torch.tensor([0, 3, 7])
    generator = torch.Generator().manual_seed(0)
    step = 0

    def generate(live: LiveConfig, sampling: LiveSampling, n: int) -> list[SamplingParams]:
        nonlocal tokens, step
        used = []
        for _ in range(n):
            live.apply(step)
            params = sampling.params  # once per token: one set for the whole batch
            logits = model(tokens)
            tokens = sample(logits, params, generator)
            assert torch.isfinite(filter_logits(logits, params)).gather(1, tokens[:, None]).all()
            if params.temperature == 0:
                assert torch.equal(tokens, logits.argmax(dim=1))
            used.append(params)
            step += 1
        return used

    with (
        DaemonProcess(work, configs=[config]) as daemon,
        LiveConfig.connect(socket=daemon.socket_path, timeout=10) as live,
        LiveSampling(live) as sampling,
    ):
        assert generate(live, sampling, 5)[-1] == SamplingParams(temperature=1.5, top_k=4)

        _save(config, "sampling:\n  temperature: 0\n  top_k: 4\n")
        _wait(lambda: live.pending_version == 2, "the change never reached the process")
        assert sampling.params.temperature == 1.5  # received, not applied: no token yet
        used = generate(live, sampling, 4)
        assert [p.temperature for p in used] == [0.0] * 4  # from the first token after it
        assert live["sampling.temperature"] == sampling.params.temperature == 0.0

        _save(config, "sampling:\n  temperature: -1\n  top_k: 4\n")
        _wait(lambda: daemon.events("change_rejected"), "the daemon never refused it")
        assert live.pending_version == 2 and live.apply(step) is False
        assert all(p.temperature == 0.0 for p in generate(live, sampling, 4))

        _save(config, "sampling:\n  temperature: 0.9\n  top_k: 1\n")
        _wait(lambda: live.pending_version == 3, "the valid change never reached the process")
        used = generate(live, sampling, 4)
        assert all(p == SamplingParams(temperature=0.9, top_k=1) for p in used)
        assert live["sampling.top_k"] == sampling.params.top_k == 1
