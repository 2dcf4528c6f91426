"""The daemon's alarm (a timerfd): armed from one thread, waited on by a selector."""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from hotknob.daemon import alarm as alarm_module
from hotknob.daemon.alarm import Alarm

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")

# Each way this interpreter can make a timerfd: the C library's always; ``os``'s from 3.13.
MAKERS = [alarm_module._libc_timerfd]
if hasattr(os, "timerfd_create"):
    MAKERS.append(alarm_module._os_timerfd)


@pytest.fixture(params=MAKERS, ids=lambda maker: maker.__name__)
def alarm(request: pytest.FixtureRequest) -> Iterator[Alarm]:
    maker: Callable[[], tuple[int, Callable[[int, float], None]] | None] = request.param
    made = maker()
    assert made is not None
    one = Alarm(*made)
    yield one
    one.close()


def readable(alarm: Alarm, wait: float = 0.0) -> bool:
    ready, _, _ = select.select([alarm.fileno()], [], [], wait)
    return bool(ready)


def test_create_gives_an_alarm_on_linux() -> None:
    made = Alarm.create()
    assert made is not None
    made.close()
    made.close()  # twice: nothing happens


def test_it_goes_off_once_after_the_time_armed(alarm: Alarm) -> None:
    assert not readable(alarm)
    armed = time.monotonic()
    alarm.arm(0.05)
    assert not readable(alarm, 0.01)
    assert readable(alarm, 5.0)
    assert time.monotonic() - armed >= 0.045
    alarm.clear()
    assert not readable(alarm, 0.1)  # one-shot
    alarm.clear()  # nothing to take: nothing happens


def test_arming_again_replaces_the_deadline(alarm: Alarm) -> None:
    alarm.arm(0.05)
    alarm.arm(0.5)
    assert not readable(alarm, 0.2)
    assert readable(alarm, 5.0)


def test_a_zero_delay_goes_off_at_once(alarm: Alarm) -> None:
    alarm.arm(0.0)  # to a timerfd, a zero deadline would disarm it
    assert readable(alarm, 1.0)


def test_it_is_not_inherited_and_never_blocks(alarm: Alarm) -> None:
    assert not os.get_inheritable(alarm.fileno())
    assert not os.get_blocking(alarm.fileno())
