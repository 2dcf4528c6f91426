"""Suite-wide fixtures: every test must leave no thread and no child process behind."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from tests.cli_forks import server_pids

pytest_plugins = ["tests.fixtures_etcd"]

# Threads owned by libraries for the life of the process, not by a test.
_PROCESS_LIFETIME_THREADS = (
    "grpc",  # gRPC's own polling/executor threads
    "ThreadPoolExecutor",
    "asyncio_",
    "pydevd",
)


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        return set()


def _child_pids() -> set[int]:
    """This process's live children, and those of the server that forks the suite's
    ``hotknob`` commands and daemons (``tests/cli_forks.py``), not the server itself."""
    servers = server_pids()
    children = _children(os.getpid()).union(*(_children(pid) for pid in servers)) - servers
    live = set()
    for pid in children:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            live.add(pid)
    return live


def _test_threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if t is not threading.main_thread()
        and t.is_alive()
        and not t.name.startswith(_PROCESS_LIFETIME_THREADS)
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Escape what a test's captured output holds that is not valid UTF-8 (a log line
    quoting an undecodable path, as some tests make on purpose): the report must cross to
    the parallel run's controller, which takes only valid UTF-8."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
        for title, text in report.sections
    ]


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A socket path in a fresh folder, short on purpose: a Unix socket path holds 107 bytes."""
    folder = tempfile.mkdtemp(prefix="hk-")
    yield os.path.join(folder, "d.sock")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaked_threads_or_processes() -> Iterator[None]:
    """Fail the test if it leaves a thread or a child process running."""
    threads_before = _test_threads()
    children_before = _child_pids()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked_threads = _test_threads() - threads_before
        leaked_children = _child_pids() - children_before
        if not (leaked_threads or leaked_children) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    problems = []
    if leaked_threads:
        problems.append("threads: " + ", ".join(sorted(t.name for t in leaked_threads)))
    if leaked_children:
        problems.append("child processes: " + ", ".join(map(str, sorted(leaked_children))))
    if problems:
        pytest.fail("test leaked " + "; ".join(problems), pytrace=False)
