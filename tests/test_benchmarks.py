"""The benchmark harness runs and writes valid results; no test here judges a time.

``python -m benchmarks --quick`` is run once, for real (etcd, daemons, client
processes), and its JSON is checked for shape only: figures, goals, a verdict per
figure, and the machine description. Speed is for ``docs/performance.md``, never
for a unit test on a shared machine.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import FAMILIES, families, normalize, render_table, summarize
from benchmarks.bench_hot_path import CallCounter
from benchmarks.support import Figure, at_most, latencies_ms, percentile, ratio_interval
from benchmarks.writers import etcd_put, paced_puts

ROOT = Path(__file__).resolve().parent.parent
MACHINE_KEYS = {"cpu_model", "cores", "memory_gb", "python", "torch", "etcd"}
FIGURE_KEYS = {"name", "value", "unit", "goal", "ok"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_run_writes_every_family_with_figures_and_verdicts(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    report, stdout = quick_run
    assert report["format"] == 1 and report["quick"] is True
    assert set(report["machine"]) >= MACHINE_KEYS
    assert isinstance(report["machine"]["cores"], int) and report["machine"]["cores"] >= 1
    assert report["machine"]["etcd"], "the etcd version must be recorded"
    assert set(report["benchmarks"]) == set(families())
    for name, result in report["benchmarks"].items():
        if name == "distributed" and result["status"] == "absent":
            continue
        assert result["status"] == "ok", (name, result.get("error"))
        assert 0 <= result["quiet_wait_s"] <= 3, (name, result["quiet_wait_s"])
        assert result["figures"], name
        for fig in result["figures"]:
            assert set(fig) == FIGURE_KEYS, (name, fig)
            assert fig["ok"] in (True, False, None)
            assert fig["value"] is None or isinstance(fig["value"], int | float)
            if fig["ok"] is not None:
                assert fig["goal"], (name, fig["name"])
    summary = report["summary"]
    goals = [f for r in report["benchmarks"].values() for f in r["figures"] if f["ok"] is not None]
    assert summary["goals"] == len(goals) >= 10
    assert summary["passed"] + len(summary["missed"]) == summary["goals"]
    assert summary["errors"] == []
    assert "benchmark" in stdout and "goals met" in stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_run_latencies_rest_on_values_that_arrived(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    """Each latency family counts the values it measured, and at least one arrived.

    Not all of them need to: a client that falls behind coalesces to the newest value.
    """
    report, _ = quick_run
    for name, figure in (("etcd_latency", "values applied"), ("file_latency", "saves applied")):
        fig = next(f for f in report["benchmarks"][name]["figures"] if f["name"] == figure)
        due = int(fig["unit"].removeprefix("of "))
        assert 0 < fig["value"] <= due, (name, fig)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_run_counts_fewer_status_writes_at_the_default_than_at_every_report(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    report, _ = quick_run
    figures = {f["name"]: f["value"] for f in report["benchmarks"]["etcd_writes"]["figures"]}
    default = next(v for k, v in figures.items() if "per process-second" in k and "default" in k)
    every = figures["status entries per process-second, every report"]
    assert 0 < default < every, figures


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_run_counts_the_calls_on_each_half_of_a_change(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    report, _ = quick_run
    figures = {f["name"]: f["value"] for f in report["benchmarks"]["hot_path"]["figures"]}
    calls = {name: value for name, value in figures.items() if "function calls" in name}
    assert len(calls) == 3, figures
    # A lone change passes through the engine, the socket server and the log; an update
    # through the decoder and the state's build; an apply swaps and acknowledges.
    assert all(value is not None and value >= 10 for value in calls.values()), calls


def test_percentile_interpolates_and_is_nan_for_nothing() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert math.isnan(percentile([], 50))


def test_latencies_pair_each_received_value_with_its_send_time() -> None:
    sent = {1: 10.0, 2: 11.0}
    assert latencies_ms(sent, [(1, 10.002), (2, 11.5), (3, 12.0)]) == pytest.approx([2.0, 500.0])


def test_a_goal_is_missed_by_a_missing_value() -> None:
    assert at_most("x", 5.0, 5.0, "ms").ok is True
    assert at_most("x", 5.1, 5.0, "ms").ok is False
    assert at_most("x", float("nan"), 5.0, "ms").ok is False
    assert Figure("x", float("nan"), "ms").as_dict()["value"] is None


def test_a_family_returning_plain_numbers_is_normalized_into_figures() -> None:
    result = normalize({"step_ms": 1.5, "note": "text"})
    assert result["figures"] == [
        {"name": "step_ms", "value": 1.5, "unit": "", "goal": "", "ok": None}
    ]
    shaped = normalize({"figures": [{"name": "a", "value": 2, "goal": "<= 3", "pass": True}]})
    assert shaped["figures"][0]["ok"] is True


def test_table_and_summary_show_misses_and_errors() -> None:
    results: dict[str, dict[str, Any]] = {
        "a": {"status": "ok", "figures": [at_most("f", 9.0, 5.0, "ms").as_dict()]},
        "b": {"status": "error", "figures": [], "error": "RuntimeError: boom"},
    }
    table = render_table(results)
    assert "MISS" in table and "ERROR" in table and "boom" in table
    summary = summarize(results)
    assert summary == {"goals": 1, "passed": 0, "missed": ["a: f"], "errors": ["b"]}


def test_the_issue_families_come_first() -> None:
    assert families()[: len(FAMILIES)] == list(FAMILIES)


@pytest.mark.parametrize("writers", [1, 3])
def test_a_writer_that_fails_fails_the_run(writers: int) -> None:
    """A put that raises must not leave a lighter run that reads as the rate asked for."""

    def put(value: int) -> None:
        if value == 5:
            raise ConnectionError("etcd went away")

    with pytest.raises(RuntimeError, match="a writer failed") as caught:
        paced_puts([put] * writers, list(range(1, 13)), 2000.0)
    assert isinstance(caught.value.__cause__, ConnectionError)


def test_values_take_the_keys_in_turn() -> None:
    class Client:
        def __init__(self) -> None:
            self.puts: list[tuple[str, str]] = []

        def put(self, key: str, value: str) -> None:
            self.puts.append((key, value))

    client = Client()
    put = etcd_put(client, ("a", "b", "c"), first=1)
    for value in range(1, 8):
        put(value)
    assert [key for key, _ in client.puts] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [value for _, value in client.puts] == [str(v) for v in range(1, 8)]


def test_a_ratio_interval_brackets_the_ratio_and_narrows_with_more_values() -> None:
    rng = random.Random(1)
    few_top = [rng.lognormvariate(0.3, 0.4) for _ in range(100)]
    few_bottom = [rng.lognormvariate(0.0, 0.4) for _ in range(100)]
    many_top = [rng.lognormvariate(0.3, 0.4) for _ in range(3000)]
    many_bottom = [rng.lognormvariate(0.0, 0.4) for _ in range(3000)]
    for q in (50, 99):
        few = ratio_interval(few_top, few_bottom, q, resamples=300)
        many = ratio_interval(many_top, many_bottom, q, resamples=300)
        for (low, high), top, bottom in ((few, few_top, few_bottom), (many, many_top, many_bottom)):
            assert low < percentile(top, q) / percentile(bottom, q) < high
        assert many[1] - many[0] < few[1] - few[0]
    # exp(0.3): the true ratio at every percentile of these two distributions.
    low, high = ratio_interval(many_top, many_bottom, 50, resamples=300)
    assert low < math.exp(0.3) < high
    assert ratio_interval(many_top, many_bottom, 50, resamples=50, seed=7) == ratio_interval(
        many_top, many_bottom, 50, resamples=50, seed=7
    )
    assert all(math.isnan(x) for x in ratio_interval([], many_bottom, 50))


class _Counted:
    def work(self, items: list[int]) -> int:
        return len(items) + abs(-1)


def test_a_call_counter_counts_each_call_after_those_skipped_and_puts_the_method_back() -> None:
    original = _Counted.work
    counter = CallCounter(_Counted, "work", skip=2)
    counted = _Counted()
    assert [counted.work([1, 2]) for _ in range(5)] == [3] * 5
    assert counter.calls == 5
    assert counter.close() == 3  # ``work`` itself, ``len`` and ``abs``, in each of 3 calls
    assert _Counted.work is original


def test_a_call_counter_that_counted_nothing_says_so() -> None:
    counter = CallCounter(_Counted, "work", skip=1)
    _Counted().work([])
    assert math.isnan(counter.close())
