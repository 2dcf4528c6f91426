"""``HeldTail``: a lone change's tail runs later, and what clients send waits for it."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from hotknob.daemon import held_tail
from hotknob.daemon.alarm import Alarm
from hotknob.daemon.held_tail import HeldTail


class FakeEngine:
    """Holds a tail until ``finish``; records what ran, in order, in ``seen``."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen
        self.held = False

    @property
    def holds_tail(self) -> bool:
        return self.held

    def finish(self) -> None:
        if self.held:
            self.held = False
            self.seen.append("tail")


def dispatch(fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    fn(*args)


class Log:
    def error(self, event: str, **fields: Any) -> None:
        raise AssertionError(event)


def make(seen: list[str]) -> tuple[HeldTail, FakeEngine]:
    engine = FakeEngine(seen)
    tail = HeldTail(lambda: engine, threading.RLock(), dispatch, Log())  # type: ignore[arg-type, return-value]
    return tail, engine


def test_what_a_client_sends_while_a_tail_is_held_waits_for_it_in_order() -> None:
    seen: list[str] = []
    tail, engine = make(seen)

    async def scenario() -> None:
        ack = tail.first(lambda name: seen.append(f"ack {name}"))
        ack("a")  # nothing held: at once
        engine.held = True
        ack("b")
        ack("c")
        assert seen == ["ack a"]  # both wait for the tail
        await asyncio.sleep(held_tail.TAIL_AFTER_S + 0.2)
        assert seen == ["ack a", "tail", "ack b", "ack c"]

    asyncio.run(scenario())


def test_a_client_gone_runs_the_tail_and_what_waits_at_once() -> None:
    seen: list[str] = []
    tail, engine = make(seen)

    async def scenario() -> None:
        ack = tail.first(lambda name: seen.append(f"ack {name}"))
        gone = tail.first(lambda name: seen.append(f"gone {name}"), wait=False)
        engine.held = True
        ack("a")
        gone("a")
        assert seen == ["tail", "ack a", "gone a"]

    asyncio.run(scenario())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the alarm is a timerfd")
def test_later_arms_the_alarm_and_the_loop_runs_the_tail_when_it_goes_off() -> None:
    seen: list[str] = []
    tail, engine = make(seen)

    async def scenario() -> None:
        tail.open(asyncio.get_running_loop())
        try:
            engine.held = True
            # As the watch thread does, on another thread, under the lock.
            result: list[bool] = []
            thread = threading.Thread(target=lambda: result.append(tail.later()))
            thread.start()
            thread.join()
            assert result == [True] and seen == []  # armed: nobody waits on that thread
            for _ in range(200):
                if seen:
                    break
                await asyncio.sleep(0.01)
            assert seen == ["tail"]
        finally:
            tail.close(asyncio.get_running_loop())

    asyncio.run(scenario())


def test_without_an_alarm_the_watch_thread_waits_and_runs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Alarm, "create", classmethod(lambda cls: None))
    seen: list[str] = []
    tail, engine = make(seen)

    async def scenario() -> None:
        tail.open(asyncio.get_running_loop())
        engine.held = True
        assert tail.later() is False
        tail.wait_and_finish()
        assert seen == ["tail"]
        tail.close(asyncio.get_running_loop())

    asyncio.run(scenario())


def test_nothing_held_needs_nothing_later() -> None:
    seen: list[str] = []
    tail, _ = make(seen)
    assert tail.later() is True  # nothing held: the caller goes on
    tail.finish()
    assert seen == []
