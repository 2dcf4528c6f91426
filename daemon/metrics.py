"""Prometheus metrics and ``/healthz`` for one daemon, on ``--metrics-addr``.

Each daemon has its own registry (no global state), so several can run in
one process, as they do in the tests.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hotknob.config import UsageError
from hotknob.config.sources import LIVE_LAYERS

from .logs import get_logger

REQUEST_TIMEOUT_S = 10.0
"""How long a connection to the metrics port may stay silent: each one holds a thread."""

MAX_CONNECTIONS = 256
"""Connections served at once, each on a thread of its own for up to ``REQUEST_TIMEOUT_S``:
one more is closed at once, so that many slow or stalled peers cannot take the memory of
the daemon (and of the pod, under its limit) one thread at a time."""

LISTEN_BACKLOG = 128
"""Connections the kernel queues before they are accepted. With the standard library's 5,
the handshake of a sixth is dropped and its client sends it again only a second later: a
burst of scrapes and probes, or a few slow peers, would make a probe miss a 1 s timeout."""


class Metrics:
    def __init__(self, app: str = "default", node: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Whose figures these are: the daemons of several apps on one host (or one
        # Prometheus job) are told apart by a join on this, as with a ``build_info``.
        Info("hotknob_daemon", "the app this daemon serves, and its node", registry=r).info(
            {"app": app, "node": node}
        )
        self.version = Gauge("hotknob_config_version", "version of the config in force", registry=r)
        self.revision = Gauge("hotknob_etcd_revision", "etcd revision in force", registry=r)
        self.accepted = Counter(
            "hotknob_changes_accepted", "accepted changes", ["layer"], registry=r
        )
        self.rejected = Counter(
            "hotknob_changes_rejected", "rejected changes", ["layer"], registry=r
        )
        self.clients = Gauge(
            "hotknob_clients_connected",
            "connected processes (hello said, not watch sessions)",
            registry=r,
        )
        self.watchers = Gauge(
            "hotknob_watchers_connected", "connected watch sessions (hotknob watch)", registry=r
        )
        self.etcd_connected = Gauge(
            "hotknob_etcd_connected", "1 if the etcd watch is up", registry=r
        )
        self.etcd_changes = Counter(
            "hotknob_etcd_changes",
            "etcd revisions taken, by where: on the watch thread (a change that came alone)"
            " or handed to the event loop (in group commits)",
            ["path"],
            registry=r,
        )
        self.watch_resumes = Counter(
            "hotknob_etcd_watch_resumes", "times the etcd watch was resumed", registry=r
        )
        self.last_change_latency = Gauge(
            "hotknob_last_change_latency_seconds",
            "time from receiving the last accepted change to publishing it",
            registry=r,
        )
        self.client_metric = Gauge(
            "hotknob_client_metric",
            "latest value a process reported with live.report()",
            ["client", "metric"],
            registry=r,
        )

        # The layers whose changes are counted, each series there from the start at 0: a
        # rate() or an alert on them has data before the first change.
        for layer in sorted(LIVE_LAYERS):
            self.accepted.labels(layer)
            self.rejected.labels(layer)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port``, ``[v6-host]:port`` or a bare IPv6 address with its port after the
    last colon (``::1:9108``); an empty host is loopback. Raises ``UsageError``."""
    host, sep, port = addr.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise UsageError(f"--metrics-addr must be host:port, got {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise UsageError(f"--metrics-addr {addr}: port must be 0 to 65535, got {number}")
    return host or "127.0.0.1", number


def _resolve(addr: str, host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The address family and socket address to listen on: IPv4 if the host has an IPv4
    address, else the first that getaddrinfo gives (an IPv6 host gets an IPv6 socket).
    Raises ``UsageError``."""
    try:
        found = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"--metrics-addr {addr}: cannot listen: {reason}") from None
    if not found:
        raise UsageError(f"--metrics-addr {addr}: cannot listen: no address for {host!r}")
    # A name such as localhost may resolve to both families, IPv6 first: IPv4 then, which
    # is what such a name meant before IPv6 was supported here and what scrapers configured
    # with 127.0.0.1 reach. An address written in IPv6 form resolves to IPv6 alone.
    family, _type, _proto, _name, sockaddr = next(
        (f for f in found if f[0] == socket.AF_INET), found[0]
    )
    return family, sockaddr


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` (JSON from ``health()``) on a background thread."""

    def __init__(self, addr: str, metrics: Metrics, health: Callable[[], dict[str, Any]]):
        family, sockaddr = _resolve(addr, *parse_addr(addr))
        metrics_ref, health_ref = metrics, health
        log = get_logger("hotknob.metrics")
        most = MAX_CONNECTIONS
        slots = threading.BoundedSemaphore(most)

        class Server(ThreadingHTTPServer):
            address_family = family
            request_queue_size = LISTEN_BACKLOG
            refusing = False  # said once per run of refusals, not once per connection

            def process_request(self, request: Any, client_address: Any) -> None:
                """A thread for the connection while fewer than ``MAX_CONNECTIONS`` are
                served; else it is closed at once, and its peer tries again."""
                if not slots.acquire(blocking=False):
                    if not self.refusing:
                        self.refusing = True
                        log.warning("metrics_connections_refused", max_connections=most)
                    self.shutdown_request(request)
                    return
                self.refusing = False
                try:
                    super().process_request(request, client_address)
                except BaseException:  # no thread started: nothing else gives the slot back
                    slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

            def handle_error(self, request: Any, client_address: Any) -> None:
                """A request that failed: one log line, not the traceback the standard
                library prints on stderr among the JSON lines. A peer that went away
                before its answer (a probe or a scrape that timed out) is no fault here."""
                exc = sys.exc_info()[1]
                if isinstance(exc, ConnectionError | TimeoutError):
                    log.debug("metrics_client_gone", peer=str(client_address), error=str(exc))
                else:
                    log.exception("metrics_request_failed", peer=str(client_address))

        class Handler(BaseHTTPRequestHandler):
            # A connection that sends nothing (or stops halfway) is closed after this,
            # not kept with its thread for ever.
            timeout = REQUEST_TIMEOUT_S

            def do_GET(self) -> None:
                self.wfile.write(self._answer())

            def do_HEAD(self) -> None:
                """As GET, without the body: what HTTP asks of every server, and what
                some uptime checkers send."""
                self._answer()

            def _not_allowed(self) -> None:
                """A method these read-only paths do not take: 405 and what they allow,
                as HTTP asks, where the standard handler says 501 (a method unknown to the
                server), which reads as a server that cannot do HTTP."""
                body = b"method not allowed: GET or HEAD\n"
                self.send_response(405)
                self.send_header("Allow", "GET, HEAD")
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

            def _answer(self) -> bytes:
                """Sends the status line and headers for the path; returns the body."""
                if self.path.split("?")[0] == "/metrics":
                    body, ctype, code = metrics_ref.exposition(), CONTENT_TYPE_LATEST, 200
                elif self.path.split("?")[0] == "/healthz":
                    status = health_ref()
                    body = json.dumps(status).encode()
                    ctype, code = "application/json", 200 if status.get("ok") else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return body

            def log_message(self, format: str, *args: Any) -> None:
                return None

        try:
            self._server = Server(sockaddr, Handler)
        except OSError as exc:  # a port in use, an address not of this host
            reason = exc.strerror or str(exc)
            raise UsageError(f"--metrics-addr {addr}: cannot listen: {reason}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="hotknob-metrics", daemon=True
        )

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
