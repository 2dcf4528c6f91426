"""The two halves of a change's path, each alone, cold and warm: where an A/B can see µs.

The latency benchmark runs six processes on the machine at once, and its p50 moves by
tens of µs between runs; a change of that size to the daemon's or the runtime's code
needs a quieter measurement. Here each half runs in one process, nothing else going:

- **daemon side**: an ``Engine`` and a ``SocketServer`` (on its loop, in a thread), one
  connected client; a lone etcd change is handed to the engine on another thread, as
  the etcd watch thread does, and timed until the update is written to the client's
  socket. Once with a change every ``GAP_S`` (the daemon asleep in between, as at 50
  changes a second) and once back to back.
- **runtime side**: a socket that stands for the daemon writes an update every
  ``GAP_S``; a ``LiveConfig`` polled like the latency benchmark's client (``apply``,
  a ``POLL_S`` sleep) is timed from the write to ``apply`` returning it, and a bare
  reader thread (the floor's client: blocking ``recv``, ``json.loads``) from the write to
  its poll seeing the value.
- **the machine**: a 300-iteration Python loop right after a ``GAP_S`` sleep and back
  to back. On a machine whose idle CPUs are slow to come back the ratio is large, and
  every stage of a change pays it (``docs/performance-history.md``, fourth round).
- **the calls each half makes**: the function calls (Python and built-in) of one lone
  change in the daemon and of one update in the runtime, counted by ``cProfile`` in
  runs of their own. A count does not move with the machine's load: between two
  versions of the code it tells added work from drift that the times cannot tell apart
  (``docs/performance-history.md``, thirty-fourth round).

Context figures only: no goal is judged here.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from benchmarks.support import Figure

NAME = "hot_path"
GAP_S = 0.02
POLL_S = 5e-5
APP = "bench"
PREFIX = f"/hotknob/{APP}/config/"


def _p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6 if samples else float("nan")


class CallCounter:
    """Counts the function calls a method makes (its own included), by ``cProfile``, in
    each call after the first ``skip``: exact where a time is noisy. ``close`` puts the
    method back."""

    def __init__(self, owner: type, name: str, skip: int) -> None:
        self._owner, self._name = owner, name
        self._original = original = getattr(owner, name)
        self._profile = cProfile.Profile()
        self._skip = skip
        self.calls = 0

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls <= skip:
                return original(*args, **kwargs)
            self._profile.enable()
            try:
                return original(*args, **kwargs)
            finally:
                self._profile.disable()

        setattr(owner, name, counted)

    def close(self) -> float:
        """Put the method back; the calls per counted call (NaN if none was counted)."""
        setattr(self._owner, self._name, self._original)
        counted = self.calls - self._skip
        if counted <= 0:
            return float("nan")
        total = sum(
            entry.callcount
            for entry in self._profile.getstats()
            if "_lsprof.Profiler" not in str(entry.code)  # its ``disable``, once a call
        )
        return total / counted


def daemon_calls(count: int) -> float:
    """Function calls per lone etcd change, all of the engine's work on it (the push and
    what follows it), after ``count // 4`` uncounted ones."""
    from hotknob.daemon.engine import Engine

    counter = CallCounter(Engine, "on_etcd_change", skip=count // 4)
    try:
        daemon_side(count, 0.0)
    finally:
        per_change = counter.close()
    return per_change


def runtime_calls(count: int) -> tuple[float, float]:
    """Function calls per update on the connection's thread (the line read, its state
    built and kept pending) and per ``apply`` that applies one."""
    from hotknob.model_runtime.client import LiveConfig
    from hotknob.model_runtime.connection import DaemonConnection

    skip = count // 4
    reads = CallCounter(DaemonConnection, "_read_lines", skip=skip + 1)  # and the snapshot
    applies = CallCounter(LiveConfig, "_apply_pending", skip=skip)
    try:
        runtime_side(count, 0.002, bare=False)
    finally:
        per_read, per_apply = reads.close(), applies.close()
    return per_read, per_apply


def daemon_side(count: int, gap: float) -> float:
    """p50 s from handing a lone etcd change to the engine to its bytes on the socket."""
    from hotknob.config import MLParams, cli_layer, defaults_layer, env_layer, files_layer
    from hotknob.config.merge import DEFAULT_PRECEDENCE
    from hotknob.daemon import logs
    from hotknob.daemon.engine import Engine
    from hotknob.daemon.published import Published
    from hotknob.daemon.socket_server import SocketServer
    from hotknob.daemon.state import StateStore
    from hotknob.model_runtime import protocol

    workdir = Path(tempfile.mkdtemp(prefix="hotknob-bench-"))
    sink = open(os.devnull, "w")  # noqa: SIM115 - closed in the finally below
    logs.configure(json=True, file=sink)  # the daemon's log lines, as the daemon writes them
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    written: list[float] = []
    holder: dict[str, Any] = {}
    server = SocketServer(workdir / "s.sock", lambda: holder["engine"].current)

    def publish(state: Published) -> None:
        server.publish(state)
        written.append(time.perf_counter())

    engine = Engine(
        schema=MLParams,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[
            defaults_layer(MLParams),
            env_layer(MLParams, environ={}),
            cli_layer([]),
            files_layer(MLParams, []),
        ],
        store=StateStore(workdir / "state", APP),
        publish=publish,
    )
    holder["engine"] = engine
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        engine.start({}, 1)
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        client.connect(str(workdir / "s.sock"))
        client.sendall(protocol.encode(protocol.hello("bench-hot-path")))
        threading.Thread(target=_drain, args=(client,), daemon=True).start()
        _wait_for(lambda: len(server.clients) == 1)
        time.sleep(0.2)  # the snapshot is out; the writer task idle again
        latencies = []
        for i in range(count):
            time.sleep(gap)
            written.clear()
            started = time.perf_counter()
            puts = {PREFIX + "train/warmup_steps": str(i + 1).encode()}
            engine.on_etcd_change(10 + i, puts, frozenset())  # as the watch thread does
            if written:
                latencies.append(written[0] - started)
        return statistics.median(latencies)
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        engine.close()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5)
        loop.close()
        structlog.reset_defaults()
        sink.close()
        shutil.rmtree(workdir, ignore_errors=True)


def runtime_side(count: int, gap: float, *, bare: bool) -> float:
    """p50 s from an update's write to ``apply`` returning it (or the bare reader's poll)."""
    from hotknob.config import MLParams
    from hotknob.model_runtime import LiveConfig, protocol

    workdir = Path(tempfile.mkdtemp(prefix="hotknob-bench-"))
    path = str(workdir / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    values = MLParams().model_dump(mode="json")
    written: dict[int, float] = {}
    done = threading.Event()

    def fake_daemon() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.makefile("rb").readline()  # hello (or the bare reader's greeting)
            conn.sendall(protocol.encode(protocol.snapshot(1, 1, values, {})))
            threading.Thread(target=_drain, args=(conn,), daemon=True).start()
            time.sleep(0.2)
            for version in range(2, count + 2):
                time.sleep(gap)
                values["train"]["warmup_steps"] = version
                line = protocol.encode(
                    protocol.update(version, version, {"train.warmup_steps": version}, values)
                )
                conn.sendall(line)
                written[version] = time.monotonic()
            done.wait(10)

    server = threading.Thread(target=fake_daemon, daemon=True)
    server.start()
    seen: dict[int, float] = {}
    try:
        if bare:
            _bare_reader(path, count, seen)
        else:
            with LiveConfig.connect(path, timeout=10, client="bench-hot-path") as live:
                step = 0
                deadline = time.monotonic() + count * gap + 10
                while len(seen) < count and time.monotonic() < deadline:
                    step += 1
                    if live.apply(step):
                        seen[live["train.warmup_steps"]] = time.monotonic()
                    time.sleep(POLL_S)
        return statistics.median(seen[v] - written[v] for v in seen if v in written)
    finally:
        done.set()
        server.join(5)
        listener.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _bare_reader(path: str, count: int, seen: dict[int, float]) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(b"{}\n")
    pending: list[int | None] = [None]

    def read() -> None:
        buffer = b""
        while data := sock.recv(65536):
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                pending[0] = json.loads(line)["values"]["train"]["warmup_steps"]

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + count * GAP_S + 10
    try:
        while len(seen) < count and time.monotonic() < deadline:
            value = pending[0]
            if value is not None and value > 1:
                pending[0] = None
                seen[value] = time.monotonic()
            time.sleep(POLL_S)
    finally:
        sock.close()


def python_loop(count: int, gap: float) -> float:
    """p50 s of a 300-iteration Python loop, each after a ``gap`` sleep."""
    samples = []
    for _ in range(count):
        if gap:
            time.sleep(gap)
        started = time.perf_counter()
        total = 0
        for i in range(300):
            total += i
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the client did not connect")
        time.sleep(0.01)


def run(quick: bool) -> dict[str, Any]:
    count = 30 if quick else 400
    cold_daemon = daemon_side(count, GAP_S)
    warm_daemon = daemon_side(count, 0.0)
    live = runtime_side(count, GAP_S, bare=False)
    bare = runtime_side(count, GAP_S, bare=True)
    cold_loop = python_loop(count, GAP_S)
    warm_loop = python_loop(count, 0.0)
    counted = 40 if quick else 200
    daemon_per_change = daemon_calls(counted)
    read_per_update, apply_per_update = runtime_calls(counted)
    figures = [
        Figure("daemon: lone change -> written, one every 20 ms", cold_daemon * 1e6, "us"),
        Figure("daemon: lone change -> written, back to back", warm_daemon * 1e6, "us"),
        Figure("runtime: written -> apply returns it (LiveConfig)", live * 1e6, "us"),
        Figure("runtime: written -> seen (bare reader thread)", bare * 1e6, "us"),
        Figure("300-iteration Python loop after a 20 ms sleep", cold_loop * 1e6, "us"),
        Figure("300-iteration Python loop, back to back", warm_loop * 1e6, "us"),
        Figure("cold / warm, that loop", cold_loop / warm_loop, "x"),
        Figure("daemon: function calls per lone change", daemon_per_change, "calls"),
        Figure("runtime: function calls per update, connection thread", read_per_update, "calls"),
        Figure("runtime: function calls per apply that applies", apply_per_update, "calls"),
    ]
    return {
        "figures": [f.as_dict() for f in figures],
        "params": {"changes": count, "gap_s": GAP_S, "poll_s": POLL_S},
    }
