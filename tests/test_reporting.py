"""The per-process reporter: what a metrics message holds, non-finite values, threads."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest

from hotknob.model_runtime import protocol
from hotknob.model_runtime.reporting import (
    MAX_METRICS,
    MetricsReporter,
    decode_value,
    encode_value,
    report_every_from_env,
)

pytestmark = pytest.mark.timeout(30)


def make(**kwargs: Any) -> tuple[MetricsReporter, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []
    return MetricsReporter(sent.append, **kwargs), sent


def test_a_message_holds_the_values_since_the_last_one_capped_at_the_window() -> None:
    reporter, _ = make(window=4)
    assert reporter.take() is None
    for step in range(10):
        reporter.report(step, loss=float(step))
    reporter.report(10, grad_norm=2.5)
    message = reporter.take()
    assert message == {
        "type": "metrics",
        "step": 10,
        "latest": {"loss": 9.0, "grad_norm": 2.5},
        "window": {"loss": [6.0, 7.0, 8.0, 9.0], "grad_norm": [2.5]},
    }
    protocol.validate_client_message(protocol.decode(protocol.encode(message)), said_hello=True)
    assert reporter.take() is None, "nothing new: no message"
    reporter.report(11, loss=1.0)
    assert reporter.take() == {
        "type": "metrics",
        "step": 11,
        "latest": {"loss": 1.0},
        "window": {"loss": [1.0]},
    }
    reporter.stop()


def test_non_finite_values_travel_as_strings_and_decode_back() -> None:
    reporter, _ = make()
    reporter.report(3, loss=math.nan, up=math.inf, down=-math.inf, ok=0.5)
    message = reporter.take()
    assert message is not None
    assert message["latest"] == {"loss": "nan", "up": "inf", "down": "-inf", "ok": 0.5}
    line = protocol.encode(message)  # JSON without NaN: the protocol refuses bare NaN
    back = protocol.decode(line)
    decoded = {k: decode_value(v) for k, v in back["latest"].items()}
    assert math.isnan(decoded["loss"] or 0.0)
    assert decoded["up"] == math.inf and decoded["down"] == -math.inf and decoded["ok"] == 0.5
    assert [encode_value(x) for x in (1.0, math.nan, math.inf, -math.inf)] == [
        1.0,
        "nan",
        "inf",
        "-inf",
    ]
    for junk in (True, None, "banana", [1], {"a": 1}):
        assert decode_value(junk) is None
    assert decode_value(3) == 3.0
    reporter.stop()


def test_values_that_are_not_numbers_are_dropped_not_sent() -> None:
    reporter, _ = make()
    reporter.report(1, loss=1.0, name="x", flag=True, n=3)
    message = reporter.take()
    assert message is not None
    assert message["latest"] == {"loss": 1.0, "n": 3.0}
    reporter.report(2, name="still not a number")
    assert reporter.take() is None
    reporter.stop()


def test_metric_count_is_bounded() -> None:
    reporter, _ = make()
    reporter.report(0, **{f"m{i}": 1.0 for i in range(MAX_METRICS + 10)})
    message = reporter.take()
    assert message is not None and len(message["latest"]) == MAX_METRICS
    reporter.stop()


def test_concurrent_reports_lose_nothing_and_send_nothing_twice() -> None:
    reporter, _ = make(window=1_000_000)
    total = 200_000
    taken: list[float] = []
    done = threading.Event()

    def train() -> None:
        for step in range(total):
            reporter.report(step, x=float(step))
        done.set()

    thread = threading.Thread(target=train, name="test-train")
    thread.start()
    while not done.is_set():
        message = reporter.take()
        if message:
            taken += message["window"]["x"]
    thread.join()
    message = reporter.take()
    if message:
        taken += message["window"]["x"]
    assert taken == [float(i) for i in range(total)]
    reporter.stop()


def test_the_thread_starts_with_the_first_metric_sends_on_time_and_stops_with_a_flush() -> None:
    reporter, sent = make(report_every_s=0.05, name="hotknob-reporter[test]")
    time.sleep(0.1)
    assert not any(t.name == "hotknob-reporter[test]" for t in threading.enumerate())
    reporter.report(1, loss=2.0)
    deadline = time.monotonic() + 5
    while not sent:
        assert time.monotonic() < deadline, "no message was sent"
        time.sleep(0.01)
    assert sent[0]["latest"] == {"loss": 2.0}
    reporter.report(2, loss=3.0)
    reporter.stop()
    assert sent[-1]["latest"] == {"loss": 3.0} and sent[-1]["step"] == 2
    assert not any(t.name == "hotknob-reporter[test]" for t in threading.enumerate())
    reporter.stop()  # idempotent
    reporter.report(3, loss=4.0)  # after stop: not kept, never sent, no thread
    assert reporter._buffers == {} and reporter.take() is None
    assert not any(t.name == "hotknob-reporter[test]" for t in threading.enumerate())


def test_report_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTKNOB_REPORT_EVERY_S", "0.25")
    assert report_every_from_env() == 0.25
    assert MetricsReporter(lambda m: None).report_every_s == 0.25
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv("HOTKNOB_REPORT_EVERY_S", bad)
        assert report_every_from_env() == 1.0
    with pytest.raises(ValueError):
        MetricsReporter(lambda m: None, window=0)
    with pytest.raises(ValueError):
        MetricsReporter(lambda m: None, report_every_s=math.inf)


def test_the_step_is_sent_as_reported_even_below_zero() -> None:
    reporter, _ = make()
    reporter.report(-100, loss=1.0)
    message = reporter.take()
    assert message is not None and message["step"] == -100  # as the acks carry it
    protocol.validate_client_message(protocol.decode(protocol.encode(message)), said_hello=True)
    reporter.report(0, loss=1.0)
    assert reporter.take() == {
        "type": "metrics",
        "step": 0,
        "latest": {"loss": 1.0},
        "window": {"loss": [1.0]},
    }
    reporter.stop()


def test_a_non_finite_value_older_than_the_window_is_still_sent() -> None:
    from hotknob.daemon.reports import decode_report

    reporter, _ = make(window=4)
    reporter.report(1, loss=1.0, grad=2.0)
    reporter.report(2, loss=math.inf, grad=math.nan)  # one overflowed step
    reporter.report(3, loss=-math.inf)  # only the first non-finite one is kept
    for step in range(4, 12):
        reporter.report(step, loss=float(step), grad=1.0)
    message = reporter.take()
    assert message is not None
    # The newest 4, and ahead of them (oldest first) the first NaN/inf of those dropped.
    assert message["window"] == {"loss": ["inf", 8.0, 9.0, 10.0, 11.0], "grad": ["nan"] + [1.0] * 4}
    assert message["latest"] == {"loss": 11.0, "grad": 1.0}
    report = decode_report(protocol.decode(protocol.encode(message)))
    assert report.non_finite(frozenset({"loss"})) == {"loss": math.inf}
    assert math.isnan(report.non_finite(frozenset({"grad"}))["grad"])
    for step in range(12, 20):  # nothing non-finite: exactly the newest 4
        reporter.report(step, loss=1.0)
    assert reporter.take() == {
        "type": "metrics",
        "step": 19,
        "latest": {"loss": 1.0},
        "window": {"loss": [1.0] * 4},
    }
    reporter.stop()
