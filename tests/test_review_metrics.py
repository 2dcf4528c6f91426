"""``--metrics-addr`` as a monitoring system uses it: probes, scrapes, bursts of connections.

Real daemons (``tests/daemon_proc.py``) and real sockets; no etcd is needed here.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hotknob.daemon import metrics as metrics_module
from hotknob.daemon.metrics import Metrics, MetricsServer
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import free_port
from tests.test_metrics_health import wait_for

pytestmark = pytest.mark.timeout(60)

APP = "t"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def daemon(tmp_path: Path, before_main: str = "") -> tuple[DaemonProcess, int]:
    port = free_port()
    extra = ("--metrics-addr", f"127.0.0.1:{port}")
    return DaemonProcess(tmp_path, app=APP, extra=extra, before_main=before_main), port


# --- /healthz while the event loop is blocked -------------------------------------------------

# In the daemon's process: a ``metrics`` message carrying ``block`` holds the event loop
# (as a handler stuck in a loop would) until the file it names exists; ``<file>.held`` says
# that the loop is held. Bounded, so that a failing test cannot leave the daemon stuck.
BLOCK_ON_METRICS = """
import os, time
from hotknob.daemon import feedback
_on_metrics = feedback.ClientFeedback.on_metrics
def on_metrics(self, client, message):
    release = message.get("block")
    if release:
        open(release + ".held", "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)
    return _on_metrics(self, client, message)
feedback.ClientFeedback.on_metrics = on_metrics
"""


def test_healthz_is_not_ok_while_the_event_loop_is_blocked(tmp_path: Path) -> None:
    proc, port = daemon(tmp_path, before_main=BLOCK_ON_METRICS)
    release = tmp_path / "release"
    with proc, RawClient(proc.socket_path, "trainer") as client:
        assert get(port, "/healthz")[0] == 200
        try:
            client.send({"type": "metrics", "step": 1, "latest": {}, "block": str(release)})
            wait_for(Path(f"{release}.held").exists, "the event loop held")
            code, body = get(port, "/healthz")
            assert code == 503, body
            assert json.loads(body)["loop"] == "blocked"
            assert proc.events("event_loop_blocked")
        finally:
            release.touch()
        # Free again: ok again, without a restart.
        wait_for(lambda: get(port, "/healthz")[0] == 200, "healthz ok once the loop runs")
        assert json.loads(get(port, "/healthz")[1])["loop"] == "ok"


# --- the listen backlog ---------------------------------------------------------------------


def test_a_burst_of_connections_waits_in_the_queue_not_dropped() -> None:
    """50 connections at once to a port whose server has not accepted them yet (as when its
    accept thread is behind): the kernel completes every handshake and queues them, rather
    than dropping them for a client to try again a second later."""
    server = MetricsServer("127.0.0.1:0", Metrics(), lambda: {"ok": True})
    with ExitStack() as stack:
        stack.callback(server.stop)
        pending = []
        for _ in range(50):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", server.port)) in (0, 115)  # EINPROGRESS
            pending.append(sock)
        deadline = time.monotonic() + 5
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], 0.2)
            for sock in writable:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                pending.remove(sock)
        assert not pending, f"{len(pending)} of 50 connections not taken within 5 s"


# --- many connections at once ---------------------------------------------------------------


def closed_unanswered(sock: socket.socket) -> bool:
    """True if the peer closed without a byte of answer: an end of stream, or a reset (a
    close with the request unread may send one)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_a_connection_past_the_most_served_at_once_is_closed_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stalled peers each hold a thread (until ``REQUEST_TIMEOUT_S``); past the most, a new
    connection is closed at once rather than given one more thread; freed, all is served."""
    monkeypatch.setattr(metrics_module, "MAX_CONNECTIONS", 8, raising=False)
    server = MetricsServer("127.0.0.1:0", Metrics(), lambda: {"ok": True})
    server.start()
    with ExitStack() as stack:
        stack.callback(server.stop)
        stalled = []
        for _ in range(8):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), 10))
            sock.sendall(b"GET /hea")  # half a request, and silence
            stalled.append(sock)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert closed_unanswered(extra), "served while 8 stalled peers held every thread"
        for sock in stalled:
            sock.close()
        wait_for(lambda: served(server.port), "served once they went")


def served(port: int) -> bool:
    """True if ``/healthz`` answers 200; False while the connection is still refused (the
    stalled peers' threads may not have seen their close yet)."""
    try:
        return get(port, "/healthz")[0] == 200
    except (ConnectionError, urllib.error.URLError):
        return False


# --- HEAD --------------------------------------------------------------------------------------


@contextmanager
def http_connection(port: int) -> Iterator[http.client.HTTPConnection]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        yield connection
    finally:
        connection.close()


def test_head_answers_as_get_without_the_body(tmp_path: Path) -> None:
    proc, port = daemon(tmp_path)
    with proc:
        for path in ("/healthz", "/metrics"):
            with http_connection(port) as connection:
                connection.request("HEAD", path)
                response = connection.getresponse()
                assert response.status == 200, path
                assert response.read() == b""
                length = int(response.getheader("Content-Length") or -1)
            with http_connection(port) as connection:
                connection.request("GET", path)
                got = connection.getresponse()
                body = got.read()
            assert got.getheader("Content-Type") == response.getheader("Content-Type")
            if path == "/healthz":  # the same body, so the same length
                assert length == len(body)
            else:  # a later scrape may differ in a figure's digits, not in being there
                assert length > 0


def test_a_method_the_paths_do_not_take_gets_405_and_what_they_allow(tmp_path: Path) -> None:
    proc, port = daemon(tmp_path)
    with proc:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            with http_connection(port) as connection:
                connection.request(method, "/healthz", body=b"{}")
                response = connection.getresponse()
                body = response.read()
            assert response.status == 405, method
            assert response.getheader("Allow") == "GET, HEAD"
            assert b"GET or HEAD" in body
        assert get(port, "/healthz")[0] == 200  # still serving


# --- series of processes that come and go ---------------------------------------------------


def client_series(port: int) -> set[tuple[str, str]]:
    """The (client, metric) labels of ``hotknob_client_metric``, read with the parser of the
    Prometheus client library (which raises on text that is not valid exposition)."""
    _, text = get(port, "/metrics")
    found = set()
    for family in text_string_to_metric_families(text):
        if family.name == "hotknob_client_metric":
            found.update((s.labels["client"], s.labels["metric"]) for s in family.samples)
    return found


def test_odd_names_parse_and_series_of_500_departed_processes_go_away(tmp_path: Path) -> None:
    proc, port = daemon(tmp_path)
    odd = ['quote"back\\slash\nnewline', "ünï", "a b", "}{=,", ""]
    with proc:
        with ExitStack() as stack:
            for name in odd:
                client = stack.enter_context(RawClient(proc.socket_path, name))
                latest = {"loss": 0.5, 'm"e\\t\nric}': 1.0, "nan": "nan", "neg": "-inf"}
                client.send({"type": "metrics", "step": 1, "latest": latest})
            wait_for(lambda: len(client_series(port)) == 5 * 4, "the odd names' series")
            assert {c for c, _ in client_series(port)} == set(odd)
        wait_for(lambda: not client_series(port), "no series once they left")
        for batch in range(10):  # 500 processes, each with names of its own
            with ExitStack() as stack:
                for i in range(batch * 50, batch * 50 + 50):
                    client = stack.enter_context(RawClient(proc.socket_path, f"proc-{i}"))
                    client.send({"type": "metrics", "step": 1, "latest": {f"m{i}": 1.0}})
                wait_for(lambda: len(client_series(port)) == 50, "a batch's series")
            wait_for(lambda: not client_series(port), "no series once the batch left")
