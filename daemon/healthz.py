"""``/healthz``: whether this daemon serves its processes now, and what it says of itself.

The answer is read on the HTTP thread (``metrics.MetricsServer``) from parts the daemon
holds: the engine, the socket server, etcd's side, the status entries' view of what is
refused, and the event loop, asked to run a no-op. It is apart from the daemon because it
only reads them, and what the answer holds and what makes it not ok read best in one
place.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .engine import Engine
from .etcd_intake import EtcdIntake
from .feedback import ClientFeedback
from .socket_server import SocketServer

LOOP_ANSWER_S = 2.0
"""How long ``/healthz`` waits for the event loop to run a no-op. A loop that cannot
within this is blocked (a handler stuck or looping): it serves its processes nothing,
so the daemon is not ok, and a liveness probe restarts it. Below the timeouts of the
readiness and liveness probes in deploy/kubernetes/job.yaml and of the image's
HEALTHCHECK (3 s and more)."""


def answer(
    *,
    engine: Engine | None,
    server: SocketServer | None,
    loop: asyncio.AbstractEventLoop | None,
    on_loop: bool,
    ready: asyncio.Event,
    etcd: EtcdIntake | None,
    feedback: ClientFeedback,
    log: Any,
) -> dict[str, Any]:
    """For ``/healthz`` (the HTTP thread). Not ok before the first snapshot is in force,
    nor once the socket path no longer leads to the socket this daemon bound (removed
    or replaced), nor while the event loop does not answer (``loop``: ``blocked``):
    processes cannot be served then, though the process still runs and this thread
    still answers."""
    socket_file = server.socket_file() if server else "not_listening"
    state = loop_state(loop, on_loop)
    if state == "blocked":
        log.warning("event_loop_blocked", waited_s=LOOP_ANSWER_S)
    ready_now = ready.is_set() and engine and engine.current
    return {
        "ok": bool(ready_now and socket_file == "ok" and state == "ok"),
        "socket": socket_file,
        "loop": state,
        "version": engine.version if engine else 0,
        "revision": engine.revision if engine else 0,
        "etcd_connected": etcd.connected if etcd is not None else None,
        "clients": count_clients(server, watch=False),
        "watchers": count_clients(server, watch=True),
        "pending_restart": dict(engine.pending_restart) if engine else {},
        "state_write_error": engine.state_write_error if engine else None,
        # Refused, while the last good state stays in force: not a fault of the daemon.
        "rejected": feedback.rejected,
        "config_files": feedback.config_files,
    }


def loop_state(loop: asyncio.AbstractEventLoop | None, on_loop: bool) -> str:
    """``ok`` if the event loop runs a no-op within ``LOOP_ANSWER_S`` (at once when asked
    from the loop itself), ``blocked`` if it does not, ``not_running`` before it starts
    and once it has closed."""
    if loop is None or loop.is_closed():
        return "not_running"
    if on_loop:
        return "ok"
    answered = threading.Event()
    try:
        loop.call_soon_threadsafe(answered.set)
    except RuntimeError:  # closed since the check above: the daemon is stopping
        return "not_running"
    return "ok" if answered.wait(LOOP_ANSWER_S) else "blocked"


def count_clients(server: SocketServer | None, *, watch: bool) -> int:
    """Connected clients that said ``hello``: processes, or ``watch`` sessions."""
    if server is None:
        return 0
    return sum(1 for client in server.clients if client.watch is watch)
