"""Child processes of the benchmarks: ``python -m benchmarks.worker ROLE --out FILE ...``.

Roles:

- ``live``: ``--clients N`` LiveConfigs on the daemon's socket; one loop calls
  ``apply(step)`` on each, then sleeps ``--poll`` seconds, and records
  ``(value, time.monotonic())`` whenever ``apply`` returns True. This is what a
  training loop sees: the time a value is *applied*, not merely received.
- ``watch``: a bare etcd-sdk-python prefix watch (the baseline), recording
  ``(value, time.monotonic())`` in the watch callback.

- ``relay-server`` and ``relay``: the floor of hotknob's architecture with none of its
  work. The server is a bare prefix watch whose callback hands each value to an
  asyncio loop (``call_soon_threadsafe``), which writes it as a JSON line to every
  client of a Unix socket; the client has a reader thread that keeps the newest value
  as pending, and a loop that polls it like ``live`` (same ``--poll``). The hops of a
  sidecar with an event loop (watch thread -> loop -> socket -> reader thread ->
  polling loop; hotknob skips the second for a change that comes alone); no merge,
  validation, versions or state.

``watch`` and ``relay-server`` watch ``--prefix`` (default: the daemon's config prefix);
the latency benchmark gives each reader a prefix of its own, so that each put wakes
one reader's chain only.

Each prints ``ready`` once it is connected, stops when every client has seen
``STOP_VALUE`` (or after ``--timeout`` seconds), and writes its records to ``--out``
as JSON: ``{"clients": [[[value, time], ...], ...], "pid": PID}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

from benchmarks.support import CONFIG_PREFIX, KEY, STOP_VALUE


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def run_live(args: argparse.Namespace) -> dict[str, Any]:
    from hotknob.model_runtime import LiveConfig

    lives = [
        LiveConfig.connect(args.socket, timeout=20, client=f"bench-{i}")
        for i in range(args.clients)
    ]
    records: list[list[tuple[int, float]]] = [[] for _ in lives]
    waiting = set(range(len(lives)))
    _ready()
    deadline = time.monotonic() + args.timeout
    poll = args.poll
    step = 0
    try:
        while waiting and time.monotonic() < deadline:
            step += 1
            for i, live in enumerate(lives):
                if live.apply(step):
                    t = time.monotonic()
                    value = live[KEY]
                    records[i].append((value, t))
                    if value == STOP_VALUE:
                        waiting.discard(i)
            time.sleep(poll)
    finally:
        for live in lives:
            live.close()
    return {"clients": records}


def run_watch(args: argparse.Namespace) -> dict[str, Any]:
    import pyetcd

    host, port = args.endpoint.rsplit(":", 1)
    client = pyetcd.client(host=host, port=int(port), timeout=10)
    records: list[tuple[int, float]] = []
    done = threading.Event()

    def on_response(response: Any) -> None:
        t = time.monotonic()
        if isinstance(response, BaseException) or response is None:
            done.set()
            return
        for event in response.events:
            value = int(event.value)
            records.append((value, t))
            if value == STOP_VALUE:
                done.set()

    watch_id = client.add_watch_prefix_callback(args.prefix, on_response)
    _ready()
    try:
        done.wait(args.timeout)
    finally:
        client.cancel_watch(watch_id)
        client.close()
    return {"clients": [records]}


def run_relay_server(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import pyetcd

    host, port = args.endpoint.rsplit(":", 1)
    client = pyetcd.client(host=host, port=int(port), timeout=10)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        writers: list[asyncio.StreamWriter] = []
        done = asyncio.Event()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            writer.write(b"{}\n")  # the client is ready once it reads this: it gets every value
            await reader.read()

        def push(value: int) -> None:
            line = (json.dumps({"value": value}) + "\n").encode()
            for writer in writers:
                writer.write(line)
            if value == STOP_VALUE:
                loop.call_later(0.2, done.set)

        def on_response(response: Any) -> None:
            if isinstance(response, BaseException) or response is None:
                loop.call_soon_threadsafe(done.set)
                return
            for event in response.events:
                loop.call_soon_threadsafe(push, int(event.value))

        server = await asyncio.start_unix_server(on_client, args.socket)
        watch_id = client.add_watch_prefix_callback(args.prefix, on_response)
        _ready()
        try:
            await asyncio.wait_for(done.wait(), args.timeout)
        finally:
            client.cancel_watch(watch_id)
            server.close()
            for writer in writers:
                writer.close()

    try:
        asyncio.run(serve())
    finally:
        client.close()
    return {"clients": []}


def run_relay(args: argparse.Namespace) -> dict[str, Any]:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + 20
    while True:
        try:
            sock.connect(args.socket)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    pending: list[int | None] = [None]
    greeting = b""
    while b"\n" not in greeting:  # the server has registered this client
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the relay server closed the connection")
        greeting += chunk

    def read() -> None:
        buffer = greeting.split(b"\n", 1)[1]
        try:
            while data := sock.recv(65536):
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    pending[0] = json.loads(line)["value"]
        except OSError:  # the loop below closed the socket: the run is over
            return

    threading.Thread(target=read, name="relay-reader", daemon=True).start()
    records: list[tuple[int, float]] = []
    _ready()
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            value = pending[0]
            if value is not None:
                pending[0] = None
                records.append((value, time.monotonic()))
                if value == STOP_VALUE:
                    break
            time.sleep(args.poll)
    finally:
        sock.close()
    return {"clients": [records]}


ROLES = {
    "live": run_live,
    "watch": run_watch,
    "relay-server": run_relay_server,
    "relay": run_relay,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--socket")
    parser.add_argument("--endpoint")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--poll", type=float, default=5e-5)
    parser.add_argument("--prefix", default=CONFIG_PREFIX)
    args = parser.parse_args()
    result = ROLES[args.role](args)
    result["pid"] = os.getpid()
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
