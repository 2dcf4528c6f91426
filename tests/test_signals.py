"""The daemon's signal handling (``daemon/signals.py``), in a process of its own: a first
SIGINT asks for a stop, a second exits at once with 130; SIGHUPs while a re-read runs make
one more re-read after it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from hotknob.daemon import signals

SCRIPT = """
import asyncio, os, signal, sys
from hotknob.daemon import signals

class Log:
    def warning(self, event): print(event, flush=True)

async def main():
    stops = []
    signals.install(lambda: stops.append(1), lambda: None, Log())
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.2)
    print("stops", len(stops), flush=True)
    os.kill(os.getpid(), signal.SIGINT)  # a second: out at once, without a clean stop
    await asyncio.sleep(5)
    print("still running", flush=True)

asyncio.run(main())
"""


def test_a_second_sigint_exits_at_once_with_130() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 130, (done.stdout, done.stderr)
    assert done.stdout.split() == ["stops", "1", "forced_exit"], done.stdout


def test_hangups_while_a_reread_runs_make_one_more_after_it() -> None:
    release = threading.Event()
    runs: list[int] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def reread() -> None:  # on a worker thread, as the daemon's
            runs.append(1)
            release.wait(5)
            loop.call_soon_threadsafe(rereads.done)

        rereads = signals.Rereads(reread, stopping)
        for _ in range(5):  # a burst of SIGHUPs while the first re-read waits
            rereads.request()
        await until(lambda: len(runs) == 1)
        release.set()
        await until(lambda: len(runs) == 2)  # one more for the four that came meanwhile
        await until(lambda: not rereads.running)
        assert len(runs) == 2  # not four
        # A request while one runs, then a stop: no re-read after the stop.
        release.clear()
        rereads.request()
        await until(lambda: len(runs) == 3)
        rereads.request()
        stopping.set()
        release.set()
        await until(lambda: not rereads.running)
        assert len(runs) == 3

    asyncio.run(scenario())


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
