"""Prometheus metrics and ``/healthz`` for one daemon, on ``--metrics-addr``.

Each daemon has its own registry (no global state), so several can run in
one process, as they do in the tests.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hotknob.config import UsageError


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.version = Gauge("hotknob_config_version", "version of the config in force", registry=r)
        self.revision = Gauge("hotknob_etcd_revision", "etcd revision in force", registry=r)
        self.accepted = Counter(
            "hotknob_changes_accepted", "accepted changes", ["layer"], registry=r
        )
        self.rejected = Counter(
            "hotknob_changes_rejected", "rejected changes", ["layer"], registry=r
        )
        self.clients = Gauge("hotknob_clients_connected", "connected processes", registry=r)
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

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--metrics-addr must be host:port, got {addr!r}")
    return host or "127.0.0.1", int(port)


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` (JSON from ``health()``) on a background thread."""

    def __init__(self, addr: str, metrics: Metrics, health: Callable[[], dict[str, Any]]):
        host, port = parse_addr(addr)
        metrics_ref, health_ref = metrics, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
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
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:  # a port in use, an address not of this host
            reason = exc.strerror or str(exc)
            raise UsageError(f"--metrics-addr {addr}: cannot listen: {reason}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="hotknob-metrics", daemon=True
        )

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
