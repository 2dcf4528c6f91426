"""A review of the runtime as an inference fleet runs it: request threads that apply and
sample while etcd changes the sampling settings under a real daemon, workers of a pre-fork
server (connected before the fork, and connected after it), and a server whose schema has
only some of the sampling keys."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.sampling import LiveSampling, SamplingParams, sample
from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer

from .daemon_stub import DaemonStub

pytestmark = pytest.mark.timeout(60)

APP = "fleet"
PREFIX = f"/hotknob/{APP}/config/sampling/"


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def settings(n: int) -> dict[str, Any]:
    """The n-th set the writer puts, in one transaction; ``top_k`` names it, so a request
    can tell a set mixed from two writes."""
    return {
        "temperature": (n % 4) * 0.5,  # 0 (greedy) included
        "top_p": 1.0 if n % 3 == 0 else 0.25 + (n % 3) / 4,  # 1.0, the bound, included
        "top_k": n,
    }


@pytest.fixture
def daemon(etcd: EtcdServer, tmp_path: Path) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint) as proc:
        yield proc


def put_settings(etcd: EtcdServer, n: int) -> None:
    puts = "".join(f"put {PREFIX}{k} {json.dumps(v)}\n" for k, v in settings(n).items())
    etcd.etcdctl("txn", input=f"\n{puts}\n\n")


def test_request_threads_see_one_version_each_and_never_a_refused_value(
    etcd: EtcdServer, daemon: DaemonProcess
) -> None:
    """16 request threads each apply and sample per token while etcd changes three knobs
    at once and puts values the schema refuses: every request's set is one the writer
    wrote, no request fails, and no refused value reaches the process."""
    with (
        LiveConfig.connect(str(daemon.socket_path), timeout=10, client="srv") as live,
        LiveSampling(live) as sampling,
    ):
        _threaded_server(etcd, daemon, live, sampling)


def _threaded_server(
    etcd: EtcdServer, daemon: DaemonProcess, live: LiveConfig, sampling: LiveSampling
) -> None:
    seen: list[dict[str, Any]] = []
    live.on_change("sampling", lambda v: seen.append(dict(v)))
    mixed: list[tuple[SamplingParams, dict[str, Any]]] = []
    errors: list[str] = []
    stop = threading.Event()
    logits = torch.randn(1, 64)
    threads_before = threading.active_count()
    fds_before = len(os.listdir("/proc/self/fd"))

    def request(i: int) -> None:
        try:
            live.apply(i)
            params = sampling.params  # once: the request's set for its whole life
            for token in range(5):
                live.apply(i * 5 + token)
                sample(logits, params)
            want = settings(params.top_k)
            got = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
            if params.top_k and got != want:
                mixed.append((params, want))
        except Exception as exc:
            errors.append(repr(exc))

    def writer() -> None:
        n = 1
        refused = iter(["-1", '"hot"', "null"] * 100)
        while not stop.is_set():
            put_settings(etcd, n)
            if n % 3 == 0:
                etcd.etcdctl("put", "--", PREFIX + "temperature", next(refused))
            n += 1

    write = threading.Thread(target=writer)
    write.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            served = 0
            deadline = time.monotonic() + 20
            while served < 1500 or len(seen) < 8:
                assert time.monotonic() < deadline, f"{served} requests, {len(seen)} changes"
                list(pool.map(request, range(served, served + 100)))
                served += 100
    finally:
        stop.set()
        write.join()
    assert not errors and not mixed
    for values in seen:  # each set applied is one the schema and the sampler accept
        SamplingParams.from_values({"sampling": values})
    assert any(v["temperature"] == 0 for v in seen) or any(v["top_p"] == 1.0 for v in seen)
    assert daemon.events("change_rejected"), "the refused values were never written"
    # The last write lands, and status shows the version this process applied.
    put_settings(etcd, 9999)
    # Apply, then look: an apply that takes a write before the last must not end the wait.
    wait_for(lambda: [live.apply(1), sampling.params.top_k == 9999][1], "the last write")
    version = live.version
    status = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint, "--json")
    assert status.returncode == 0, status.stderr
    wait_for(
        lambda: (
            f'"version": {version}'
            in run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint, "--json").stdout
        ),
        "status never showed the applied version",
    )
    assert threading.active_count() == threads_before
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 1


def _fork_worker(body: Callable[[], dict[str, Any]]) -> tuple[int, int]:
    """Fork a worker that runs ``body`` and writes its result as JSON to the returned fd."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_fd)
            try:
                result = body()
            except BaseException as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_fd, json.dumps(result).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    return pid, read_fd


def _worker_result(pid: int, fd: int, timeout: float = 20.0) -> dict[str, Any]:
    data = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("the worker reported nothing in time")
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    return json.loads(bytes(data))


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_pre_fork_worker_that_inherits_the_connection_says_it_gets_no_change(
    etcd: EtcdServer, daemon: DaemonProcess
) -> None:
    """A pre-fork server whose parent connected before forking: a worker that serves with
    the inherited ``LiveSampling`` never gets a change and is in no status, which it now
    says in its log (it was silent); a worker that connects after the fork gets the
    change and is in ``status``."""
    with (
        LiveConfig.connect(str(daemon.socket_path), timeout=10, client="parent") as live,
        LiveSampling(live) as sampling,
    ):
        _pre_fork_server(etcd, daemon, live, sampling)


def _pre_fork_server(
    etcd: EtcdServer, daemon: DaemonProcess, live: LiveConfig, sampling: LiveSampling
) -> None:
    put_path = PREFIX + "top_k"
    go = os.pipe()

    def inherited() -> dict[str, Any]:
        lines = _Lines()
        logging.getLogger("hotknob.model_runtime").addHandler(lines)
        os.read(go[0], 1)  # the parent wrote the change
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and sampling.params.top_k != 31:
            live.apply(1)
            sampling.params  # noqa: B018 - a request's read
            time.sleep(0.01)
        return {"top_k": sampling.params.top_k, "forked": live.forked, "log": lines.lines}

    def reconnected() -> dict[str, Any]:
        with (
            LiveConfig.connect(str(daemon.socket_path), timeout=10, client="worker") as own,
            LiveSampling(own) as mine,
        ):
            os.read(go[0], 1)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and mine.params.top_k != 31:
                own.apply(1)
                time.sleep(0.01)
            status = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint)
            return {"top_k": mine.params.top_k, "status": status.stdout}

    workers = [_fork_worker(inherited), _fork_worker(reconnected)]
    os.close(go[0])
    wait_for(
        lambda: (
            "worker" in run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint).stdout
        ),
        "the worker that connected never showed in status",
    )
    etcd.etcdctl("put", put_path, "31")
    os.write(go[1], b"xx")
    os.close(go[1])
    first, second = (_worker_result(pid, fd) for pid, fd in workers)
    assert "error" not in first and "error" not in second, (first, second)
    assert first["forked"] and first["top_k"] == 0
    assert [line for line in first["log"] if "live_sampling_forked" in line], first["log"]
    assert second["top_k"] == 31
    assert "vm/worker" in second["status"] or "/worker" in second["status"], second["status"]
    wait_for(lambda: live.apply(2) or sampling.params.top_k == 31, "the parent's change")


def test_a_schema_without_some_sampling_keys_warns_of_each_once(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server whose schema has only ``temperature`` and ``top_p``: each missing key was
    warned of at every change and at every request's ``LiveSampling`` (four lines per
    request); now once while it stays missing, and again once a key that came goes."""
    section = "fleet_sampling"  # a section of its own: what other tests warned of is theirs
    values = {section: {"temperature": 0.5, "top_p": 0.9}}
    with (
        DaemonStub(sock_path, values) as stub,
        LiveConfig.connect(stub.path, timeout=5, client="srv") as live,
        caplog.at_level(logging.WARNING, logger="hotknob.model_runtime.sampling"),
        LiveSampling(live, section) as sampling,
    ):
        for i in range(10):
            version = stub.push({section: {"temperature": 0.1 * i, "top_p": 0.9}})
            wait_for(lambda v=version: live.pending_version == v, "the change")  # type: ignore[misc]
            assert live.apply(i)

        def request(i: int) -> float:
            with LiveSampling(live, section) as per_request:
                return per_request.params.temperature

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(request, range(64)))
        missing = [
            r.getMessage() for r in caplog.records if "sampling_key_missing" in r.getMessage()
        ]
        assert len(missing) == 4, missing
        assert {m.split()[1] for m in missing} == {
            f"key={section}.{k}" for k in ("top_k", "min_p", "repetition_penalty", "max_new_tokens")
        }
        caplog.clear()
        version = stub.push({section: {"temperature": 0.5, "top_p": 0.9, "top_k": 7}})
        wait_for(lambda: live.pending_version == version, "the change")
        assert live.apply(20) and sampling.params.top_k == 7
        version = stub.push({section: {"temperature": 0.5, "top_p": 0.9}})
        wait_for(lambda: live.pending_version == version, "the change")
        assert live.apply(21) and sampling.params.top_k == 7
        again = [r.getMessage() for r in caplog.records if "sampling_key_missing" in r.getMessage()]
        assert len(again) == 1 and f"key={section}.top_k using=7" in again[0], again
