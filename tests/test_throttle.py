"""The daemon's throttle: a lone call runs at once, a burst runs once per interval."""

from __future__ import annotations

import asyncio

from hotknob.daemon.throttle import Throttle


def test_lone_call_runs_at_once_and_a_burst_coalesces() -> None:
    async def scenario() -> list[int]:
        runs: list[int] = []
        state = {"n": 0}
        throttle = Throttle(0.05, lambda: runs.append(state["n"]))
        state["n"] = 1
        throttle()
        assert runs == [1]  # at once: nothing ran in the last interval
        for n in range(2, 12):
            state["n"] = n
            throttle()
        assert runs == [1]  # held back, not dropped
        await asyncio.sleep(0.12)
        assert runs == [1, 11]  # one run, with the newest state
        await asyncio.sleep(0.06)
        state["n"] = 12
        throttle()
        return runs

    assert asyncio.run(scenario()) == [1, 11, 12]


def test_cancel_drops_the_pending_run() -> None:
    async def scenario() -> list[str]:
        runs: list[str] = []
        throttle = Throttle(0.05, lambda: runs.append("ran"))
        throttle()
        throttle()
        throttle.cancel()
        await asyncio.sleep(0.1)
        return runs

    assert asyncio.run(scenario()) == ["ran"]


def test_idle_and_ran_let_another_thread_run_the_work_itself() -> None:
    async def scenario() -> list[str]:
        runs: list[str] = []
        throttle = Throttle(0.05, lambda: runs.append("loop"))
        assert throttle.idle()
        throttle.ran()  # the caller did the work itself (on another thread)
        assert not throttle.idle()
        throttle()  # within the interval: held back, not run at once
        assert runs == []
        assert not throttle.idle()  # a run is due
        await asyncio.sleep(0.08)
        assert runs == ["loop"]
        await asyncio.sleep(0.06)
        assert throttle.idle()
        return runs

    assert asyncio.run(scenario()) == ["loop"]
