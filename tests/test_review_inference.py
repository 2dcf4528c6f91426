"""A review of the live sampling settings as a threaded inference server uses them: request
threads that build their own ``LiveSampling`` while another thread applies, and a server
whose sampling settings live in a section of its own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.binding import Handle
from hotknob.model_runtime.errors import InvalidValue
from hotknob.model_runtime.sampling import LiveSampling, SamplingParams

from .daemon_stub import DaemonStub

SAMPLING: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 16}


def with_sampling(**overrides: Any) -> dict[str, Any]:
    return {"sampling": {**SAMPLING, **overrides}}


@pytest.fixture
def stub(sock_path: str) -> Iterator[DaemonStub]:
    with DaemonStub(sock_path, with_sampling()) as server:
        yield server


@pytest.fixture
def live(stub: DaemonStub) -> Iterator[LiveConfig]:
    with LiveConfig.connect(stub.path, timeout=5, client="server-0") as client:
        yield client


def test_a_live_sampling_made_on_a_request_thread_while_another_applies_misses_nothing(
    stub: DaemonStub, live: LiveConfig
) -> None:
    """A request thread builds its ``LiveSampling`` (as ``examples/generate.py``'s
    ``generate`` does per call) while the control loop applies a change: the change came
    after the request read the values and before it registered its callback. The request
    kept the old temperature for good (until the next ``sampling`` change), though the
    process reported the new version applied."""
    version = stub.push(with_sampling(temperature=0.0, top_k=4))
    stub.wait_for(lambda: live.pending_version == version)
    read, applied = threading.Event(), threading.Event()
    register = live.on_change

    def on_change_after_an_apply(key: str, fn: Callable[..., None]) -> Handle:
        read.set()  # the values are read: the control loop applies now
        assert applied.wait(5)
        return register(key, fn)

    live.on_change = on_change_after_an_apply  # type: ignore[method-assign]
    made: list[LiveSampling] = []
    request = threading.Thread(target=lambda: made.append(LiveSampling(live)))
    request.start()
    try:
        assert read.wait(5)
        assert live.apply(1) is True  # the control loop, on this thread
    finally:
        applied.set()
        request.join(5)
    del live.on_change
    (sampling,) = made
    try:
        assert live.version == version
        assert sampling.params == SamplingParams(temperature=0.0, top_k=4, max_new_tokens=16)
        # And it follows the changes after it, as any other.
        version = stub.push(with_sampling(temperature=0.7))
        stub.wait_for(lambda: live.pending_version == version)
        assert live.apply(2) is True
        assert sampling.params.temperature == 0.7 and sampling.params.top_k == 0
    finally:
        sampling.close()


def test_a_value_refused_in_a_section_of_its_own_names_that_sections_key() -> None:
    """``LiveSampling(live, section="serving.sampling")``: a refused value was reported as
    ``sampling.temperature``, a key that schema does not have (the warning for a missing
    key named the section's own key)."""
    values = {"serving": {"sampling": {"temperature": -1.0}}}
    with pytest.raises(InvalidValue, match=r"^serving\.sampling\.temperature: must be >= 0"):
        SamplingParams.from_values(values, "serving.sampling")
    flat = {"serving.sampling.top_k": 2.5}
    with pytest.raises(InvalidValue, match=r"^serving\.sampling\.top_k: expected an integer"):
        SamplingParams.from_values(flat, "serving.sampling")
    # The default section says what it always said.
    with pytest.raises(InvalidValue, match=r"^sampling\.top_p: must be in \(0, 1\]"):
        SamplingParams.from_values({"sampling": {"top_p": 0.0}})
