"""What ``live.report`` and ``live.apply`` send when given odd steps or too many or too long
metric names, and what a real daemon then keeps: every message the runtime builds must
be one the protocol accepts, and a name past a limit must cost one warning, not a
message lost every interval."""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hotknob.model_runtime import LiveConfig, protocol
from hotknob.model_runtime.reporting import (
    FITTING_WINDOW,
    MAX_METRICS,
    MAX_NAME_CHARS,
    MetricsReporter,
    step_number,
)
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.daemon_stub import DaemonStub
from tests.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.timeout(90)


def make(**kwargs: Any) -> tuple[MetricsReporter, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []
    return MetricsReporter(sent.append, report_every_s=3600, **kwargs), sent


def sendable(message: dict[str, Any] | None) -> dict[str, Any]:
    """``message`` as the daemon reads it: encoded, decoded and validated."""
    assert message is not None
    line = protocol.decode(protocol.encode(message))
    protocol.validate_client_message(line, said_hello=True)
    return line


def dropped_logs(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(event)]


# -- the step ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step",
    [5, np.int64(5), np.uint8(5), torch.tensor(5), 5.0, np.float64(5.0), np.float32(5.0)],
    ids=repr,
)
def test_a_step_that_is_an_integer_in_all_but_type_is_sent_as_an_int(step: Any) -> None:
    reporter, _ = make()
    reporter.report(step, loss=1.0)
    message = sendable(reporter.take())
    assert message["step"] == 5 and type(message["step"]) is int
    reporter.stop()


@pytest.mark.parametrize(
    "step",
    [5.5, math.nan, math.inf, True, "5", None, 2**63, torch.tensor(5.0)],
    ids=repr,
)
def test_a_step_that_is_no_integer_drops_its_values_with_one_warning(
    step: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises((TypeError, ValueError)):
        step_number(step)
    reporter, _ = make()
    with caplog.at_level(logging.WARNING, logger="hotknob.model_runtime"):
        for _ in range(3):
            reporter.report(step, loss=1.0)
            assert reporter.take() is None  # dropped: no message the daemon would refuse
        assert reporter._buffers["loss"] == []  # and not kept either
    assert len(dropped_logs(caplog, "live_report_step_unusable")) == 1
    reporter.report(7, loss=2.0)  # a good step again: reported as usual
    assert sendable(reporter.take())["latest"] == {"loss": 2.0}
    reporter.stop()


# -- names ------------------------------------------------------------------------------


def test_names_past_the_limits_are_dropped_with_one_warning_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reporter, _ = make()
    with caplog.at_level(logging.WARNING, logger="hotknob.model_runtime"):
        many = {f"m{i}": 1.0 for i in range(MAX_METRICS)}
        long_name = "x" * (MAX_NAME_CHARS + 1)
        for step in range(3):
            reporter.report(step, **many, extra=1.0, **{long_name: 2.0})
            message = sendable(reporter.take())
            assert len(message["latest"]) == MAX_METRICS
            assert "extra" not in message["latest"] and long_name not in message["latest"]
    logged = dropped_logs(caplog, "live_metric_names_dropped")
    assert len(logged) == 2, logged
    assert any("reason=more_than_max_metrics" in line and "'extra'" in line for line in logged)
    assert any("reason=name_too_long" in line for line in logged)
    reporter.stop()


def test_a_name_of_the_longest_length_is_kept() -> None:
    reporter, _ = make()
    reporter.report(1, **{"y" * MAX_NAME_CHARS: 1.0})
    assert list(sendable(reporter.take())["latest"]) == ["y" * MAX_NAME_CHARS]
    reporter.stop()


def test_a_nan_loss_beside_long_names_still_reaches_the_daemon() -> None:
    reporter, _ = make()
    names = {f"n{i}_" + "x" * 2100: 1.0 for i in range(MAX_METRICS - 1)}
    reporter.report(1, loss=math.nan, **names)
    message = sendable(reporter.take())
    assert message["latest"] == {"loss": "nan"}
    reporter.stop()


def _worst_names() -> list[str]:
    """``MAX_METRICS`` names of ``MAX_NAME_CHARS`` characters that JSON writes as 6 bytes
    each (``\\u0001``): the largest names the reporter accepts."""
    six_bytes = [chr(c) for c in (*range(0x00, 0x08), 0x0B, *range(0x0E, 0x20))]
    names = [a + b + "\x01" * (MAX_NAME_CHARS - 2) for a in six_bytes for b in six_bytes][
        :MAX_METRICS
    ]
    assert len(set(names)) == MAX_METRICS
    return names


@pytest.mark.parametrize("window", [32, FITTING_WINDOW, 10_000])
def test_the_largest_message_fits_one_line(window: int) -> None:
    # The widest numbers there are, and a leading non-finite value ahead of each window.
    sent: list[dict[str, Any]] = []
    reporter = MetricsReporter(sent.append, report_every_s=3600, window=window)
    names = _worst_names()
    reporter.report(0, **dict.fromkeys(names, -math.inf))
    for step in range(1, window + 40):
        reporter.report(step, **dict.fromkeys(names, -1.7976931348623157e308))
    assert reporter.flush()
    (message,) = sent
    assert len(protocol.encode(message)) <= protocol.MAX_LINE_BYTES
    values = message["window"][names[0]]
    assert values[0] == "-inf" and len(values) == min(window, FITTING_WINDOW) + 1
    reporter.stop()


# -- after close ------------------------------------------------------------------------


def test_report_after_stop_keeps_nothing() -> None:
    reporter, sent = make()
    report = reporter.report  # a reference kept by the training loop
    report(0, loss=1.0)
    reporter.stop()
    assert sent[-1]["latest"] == {"loss": 1.0}
    for step in range(1000):
        report(step, loss=1.0, new_name=2.0)
    assert reporter._buffers == {}
    assert reporter.take() is None


# -- against a real protocol server: acks -----------------------------------------------


@pytest.fixture
def stub(sock_path: str) -> Iterator[DaemonStub]:
    with DaemonStub(sock_path, {"train": {"lr": 0.1}}, version=3) as server:
        yield server


def _acks(stub: DaemonStub) -> list[dict[str, Any]]:
    return stub.messages("applied")


def test_apply_with_a_numpy_step_acknowledges_with_an_int(stub: DaemonStub) -> None:
    with LiveConfig.connect(stub.path, timeout=5, client="np") as live:
        stub.wait_for(lambda: len(_acks(stub)) == 1)
        for step in (np.int64(3), 7.0):
            version = stub.push({"train": {"lr": float(step)}})
            stub.wait_for(lambda: live.pending_version == version)  # noqa: B023
            assert live.apply(step) is True  # type: ignore[arg-type]
        stub.wait_for(lambda: len(_acks(stub)) == 3)
        for ack in _acks(stub):
            protocol.validate_client_message(ack, said_hello=True)
        assert [(a["version"], a["step"]) for a in _acks(stub)] == [(3, 0), (4, 3), (5, 7)]
        assert type(live.state_dict()["step"]) is int
        json.dumps(live.state_dict())


def test_apply_with_a_step_that_is_no_integer_applies_and_says_so(
    stub: DaemonStub, caplog: pytest.LogCaptureFixture
) -> None:
    with LiveConfig.connect(stub.path, timeout=5, client="bad") as live:
        stub.wait_for(lambda: len(_acks(stub)) == 1)
        stub.push({"train": {"lr": 0.5}})
        stub.wait_for(lambda: live.pending_version == 4)
        with caplog.at_level(logging.WARNING, logger="hotknob.model_runtime"):
            assert live.apply("step 9") is True  # type: ignore[arg-type]
        assert live["train.lr"] == 0.5 and live.version == 4
        logged = [r for r in caplog.records if r.getMessage().startswith("live_apply_step")]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR
        assert not [r for r in caplog.records if r.exc_info]  # no traceback
        assert stub.connections == 1
    assert len(_acks(stub)) == 1


def test_report_after_close_does_nothing(stub: DaemonStub) -> None:
    live = LiveConfig.connect(stub.path, timeout=5, client="closing")
    report = live.report
    report(0, loss=1.0)
    live.close()
    live.report(1, loss=2.0)
    report(2, loss=3.0)  # the reporter's own method, kept from before the close
    assert live._reporter._buffers == {}
    # What close sent arrives at the stub's own pace; nothing after it was kept to send.
    stub.wait_for(lambda: bool(stub.messages("metrics")))
    assert [m["latest"] for m in stub.messages("metrics")] == [{"loss": 1.0}]


# -- against a real daemon and etcd -----------------------------------------------------


def _wait(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_real_daemon_keeps_odd_steps_and_caps_a_wide_client(
    etcd: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTKNOB_REPORT_EVERY_S", "0.1")
    port = free_port()
    extra = ["--metrics-addr", f"127.0.0.1:{port}", "--node", "n1"]
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=extra) as daemon:

        def status() -> dict[str, dict[str, Any]]:
            done = run_cli("status", "--app", "t", "--etcd-endpoints", etcd.endpoint, "--json")
            assert done.returncode == 0, done.stderr
            return {p["client"]: p for p in json.loads(done.stdout)["processes"]}

        def series(client: str) -> int:
            url = f"http://127.0.0.1:{port}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            return text.count(f'hotknob_client_metric{{client="{client}"')

        with RawClient(daemon.socket_path, name="wide") as wide:
            for part in range(3):  # more names, and longer ones, than the runtime would send
                names = [f"layer{part}.{i:04d}" for i in range(150)] + ["z" * 300]
                wide.send({"type": "metrics", "step": part, "latest": dict.fromkeys(names, 1.0)})
            with LiveConfig.connect(daemon.socket_path, timeout=10, client="good") as live:
                first = live.version
                run_cli("set", "--app", "t", "--etcd-endpoints", etcd.endpoint, "train.lr=0.02")
                for step in np.arange(500):
                    live.apply(step)  # a numpy step: the ack still reaches the daemon
                    live.report(float(step), loss=0.5)  # a float step: reported as usual
                    if live.version > first and step > 20:
                        break
                    time.sleep(0.02)
                assert live.version > first
                time.sleep(0.3)
                _wait(lambda: status().get("good", {}).get("version") == live.version)
                entries = status()
                assert entries["good"]["metrics"]["latest"] == {"loss": 0.5}
                assert len(entries["wide"]["metrics"]["latest"]) == 256
                assert series("wide") == 256 and series("good") == 1
        assert not daemon.events("client_error")  # nobody disconnected for what it sent
        (warned,) = daemon.events("client_metrics_dropped")
        assert warned["client"] == "wide" and warned["max_metrics"] == 256
        assert not daemon.events("status_publish_failed")
