"""examples/generate.py on a real protocol-1 socket: live sampling lands at token boundaries."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from hotknob.model_runtime import LiveConfig

from .daemon_stub import DaemonStub

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "generate.py"

SAMPLING: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "max_new_tokens": 24,
}
BASE: dict[str, Any] = {"train": {"lr": 0.001}, "sampling": SAMPLING}


def with_sampling(**overrides: Any) -> dict[str, Any]:
    return {"train": dict(BASE["train"]), "sampling": {**SAMPLING, **overrides}}


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hotknob_generate_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while building
    spec.loader.exec_module(module)
    return module


gen = _load_example()


@pytest.fixture(scope="module")
def model() -> Any:
    return gen.build_model(seed=0, train_seconds=0)


@pytest.fixture
def stub(sock_path: str) -> Iterator[DaemonStub]:
    with DaemonStub(sock_path, BASE, version=7) as server:
        yield server


@pytest.fixture
def live(stub: DaemonStub) -> Iterator[LiveConfig]:
    with LiveConfig.connect(stub.path, timeout=5, client="generator-0") as client:
        yield client


class PushAt:
    """An ``on_token`` hook that records every event and, right after token ``at``, pushes
    ``values`` and waits until the client holds them as pending (not yet applied)."""

    def __init__(self, stub: DaemonStub, live: LiveConfig, at: int, values: Any) -> None:
        self.stub, self.live, self.at, self.values = stub, live, at, values
        self.events: list[Any] = []
        self.pushed_version: int | None = None

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        if event.index == self.at:
            version = self.stub.push(self.values)
            self.stub.wait_for(lambda: self.live.pending_version == version)
            assert self.live.version < version  # received, not applied mid-token
            self.pushed_version = version


def _argmax(event: Any) -> int:
    return int(event.logits.argmax())


def _acks(stub: DaemonStub) -> list[dict[str, Any]]:
    return stub.messages("applied")


def test_temperature_zero_takes_effect_at_the_next_token_and_is_greedy(
    stub: DaemonStub, live: LiveConfig, model: Any
) -> None:
    first, n = 50, 30
    k = first + 9
    hook = PushAt(stub, live, k, with_sampling(temperature=0.0))
    generator = torch.Generator().manual_seed(1)
    tokens = gen.generate(live, model, n, generator, hook, prompt="The ", first_index=first)

    events = hook.events
    assert tokens == [e.token for e in events] and len(tokens) == n
    assert [e.index for e in events] == list(range(first, first + n))
    assert hook.pushed_version == 8
    before = [e for e in events if e.index <= k]
    after = [e for e in events if e.index > k]
    assert all(e.version == 7 and e.params.temperature == 1.0 for e in before)
    assert all(e.version == 8 and e.params.temperature == 0.0 for e in after)
    assert [e.index for e in events if e.applied] == [k + 1]
    assert all(e.token == _argmax(e) for e in after)  # greedy: the argmax at every step
    assert any(e.token != _argmax(e) for e in before)  # so the change made a difference
    # Rebuilt once, when the change was applied: one params object on each side.
    assert len({id(e.params) for e in before}) == 1
    assert len({id(e.params) for e in after}) == 1
    stub.wait_for(lambda: any(a["version"] == 8 and a["step"] == k + 1 for a in _acks(stub)))


def test_a_change_outside_sampling_keeps_the_params_object(
    stub: DaemonStub, live: LiveConfig, model: Any
) -> None:
    values = with_sampling()
    values["train"]["lr"] = 0.5
    hook = PushAt(stub, live, 3, values)
    gen.generate(live, model, 8, torch.Generator().manual_seed(2), hook)

    events = hook.events
    assert [e.version for e in events] == [7] * 4 + [8] * 4
    assert events[4].applied and live["train.lr"] == 0.5
    assert all(e.params is events[0].params for e in events)


def test_an_invalid_sampling_value_keeps_the_last_good_params(
    stub: DaemonStub, live: LiveConfig, model: Any
) -> None:
    hook = PushAt(stub, live, 2, with_sampling(temperature=-1.0, top_k=3))
    gen.generate(live, model, 6, torch.Generator().manual_seed(3), hook)

    events = hook.events
    assert [e.version for e in events] == [7] * 3 + [8] * 3
    assert all(e.params is events[0].params for e in events)
    assert events[-1].params.temperature == 1.0 and events[-1].params.top_k == 0
    stub.wait_for(lambda: any(a["version"] == 8 for a in _acks(stub)))
    ack = next(a for a in _acks(stub) if a["version"] == 8)
    assert ack["step"] == 3
    assert any("temperature" in error["error"] for error in ack["errors"])


def test_a_live_max_new_tokens_ends_the_request_at_the_next_boundary(
    stub: DaemonStub, live: LiveConfig, model: Any
) -> None:
    plain: list[Any] = []
    tokens = gen.generate(live, model, None, torch.Generator().manual_seed(4), plain.append)
    assert len(tokens) == SAMPLING["max_new_tokens"]

    hook = PushAt(stub, live, len(tokens) + 2, with_sampling(max_new_tokens=5))
    tokens = gen.generate(
        live, model, None, torch.Generator().manual_seed(4), hook, first_index=len(tokens)
    )
    assert len(tokens) == 5
    assert [e.version for e in hook.events] == [7, 7, 7, 8, 8]


def test_a_shared_live_sampling_outlives_requests_and_unregisters(
    stub: DaemonStub, live: LiveConfig, model: Any
) -> None:
    sampling = gen.LiveSampling(live)
    try:
        first = sampling.params
        hook = PushAt(stub, live, 1, with_sampling(top_k=4))
        gen.generate(live, model, 3, torch.Generator(), hook, sampling=sampling)
        assert hook.events[-1].params is sampling.params
        assert sampling.params.top_k == 4 and first.top_k == 0
    finally:
        sampling.close()
    stub.push(with_sampling(top_k=9))
    stub.wait_for(lambda: live.pending_version == 9)
    assert live.apply(10)
    assert live["sampling.top_k"] == 9 and sampling.params.top_k == 4


def test_build_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = gen.build_model(seed=5, train_seconds=0)
    b = gen.build_model(seed=5, train_seconds=0)
    c = gen.build_model(seed=6, train_seconds=0)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.head.weight, c.head.weight)
    assert a.decode(a.encode("The harbour")) == "The harbour"
    with pytest.raises(ValueError, match="alphabet"):
        a.encode("\u00e9")


def test_the_script_generates_against_a_socket_and_logs_every_token(
    stub: DaemonStub, tmp_path: Path
) -> None:
    log = tmp_path / "tokens.jsonl"
    result = subprocess.run(
        [
            *(sys.executable, str(SCRIPT), "--socket", stub.path, "--requests", "2"),
            *("--train-seconds", "0", "--seed", "3", "--log", str(log)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "connected: version 7" in result.stdout
    assert result.stdout.count("temperature=1 ") == 2
    assert "request 0" in result.stdout and "request 1" in result.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    per_request = SAMPLING["max_new_tokens"]
    assert [r["token_index"] for r in records] == list(range(2 * per_request))
    assert [r["request"] for r in records] == [0] * per_request + [1] * per_request
    assert all(r["version"] == 7 and r["temperature"] == 1.0 for r in records)
    text = "".join(r["char"] for r in records[:per_request])
    assert text in result.stdout
    stub.wait_for(lambda: len(stub.messages("hello")) == 1 and stub.connections == 0)


def test_the_script_reports_a_missing_daemon_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, str(SCRIPT), "--socket", str(tmp_path / "none.sock")),
            *("--train-seconds", "0", "--connect-timeout", "0.3"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert result.stderr.startswith("error: no hotknob daemon at ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_script_refuses_an_invalid_initial_value_in_one_line_and_disconnects(
    sock_path: str,
) -> None:
    with DaemonStub(sock_path, with_sampling(temperature=-1.0), version=1) as server:
        result = subprocess.run(
            [*(sys.executable, str(SCRIPT), "--socket", sock_path, "--train-seconds", "0")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: ")
        assert "sampling.temperature" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        server.wait_for(lambda: server.connections == 0)


def test_a_change_that_ends_the_request_is_marked(
    model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    before, after = gen.SamplingParams(max_new_tokens=24), gen.SamplingParams(max_new_tokens=5)
    printer = gen._Printer(model, 0, None, 0.0, before)
    event = gen.TokenEvent(0, 0, 1, torch.zeros(model.vocab_size), before, 7, False)
    printer(event)
    printer.finish(before, 7)
    assert "[" not in capsys.readouterr().out
    printer.finish(after, 8)
    assert capsys.readouterr().out == "[v8: max_new_tokens=5 ends the request]"


def test_null_means_off_and_a_removed_key_keeps_its_value_with_a_warning(
    stub: DaemonStub, live: LiveConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with gen.LiveSampling(live) as sampling:
        stub.push(with_sampling(temperature=0.0, top_p=None, top_k=7))
        stub.wait_for(lambda: live.pending_version == 8)
        assert live.apply(1)
        assert sampling.params == gen.SamplingParams(temperature=0.0, top_k=7, max_new_tokens=24)
        stub.wait_for(lambda: any(a["version"] == 8 for a in _acks(stub)))
        assert not next(a for a in _acks(stub) if a["version"] == 8).get("errors")

        values = with_sampling(temperature=0.5)
        del values["sampling"]["top_k"]
        stub.push(values)
        stub.wait_for(lambda: live.pending_version == 9)
        with caplog.at_level(logging.WARNING, logger="hotknob.model_runtime.sampling"):
            assert live.apply(2)
        assert sampling.params.temperature == 0.5 and sampling.params.top_k == 7
        assert "key=sampling.top_k using=7" in caplog.text
