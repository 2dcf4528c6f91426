"""``--metrics-addr``: what ``/metrics`` and ``/healthz`` say, and how the address is taken.

Real daemons (``tests/daemon_proc.py``), real etcd where etcd matters, real sockets.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon import metrics as metrics_module
from hotknob.daemon.metrics import Metrics, MetricsServer, parse_addr
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.timeout(90)

APP = "t"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def health(port: int) -> tuple[int, dict[str, Any]]:
    code, body = get(f"http://127.0.0.1:{port}/healthz")
    return code, json.loads(body)


def samples(port: int) -> dict[str, float]:
    """Every sample of ``/metrics``, by its name with labels."""
    _, text = get(f"http://127.0.0.1:{port}/metrics")
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return result


def daemon(tmp_path: Path, *, endpoints: str | None = None, extra: tuple[str, ...] = ()) -> Any:
    port = free_port()
    args = ["--metrics-addr", f"127.0.0.1:{port}", *extra]
    return DaemonProcess(tmp_path, app=APP, endpoints=endpoints, extra=args), port


# --- /healthz and the socket file ------------------------------------------------------------


def test_healthz_is_not_ok_once_the_socket_file_is_removed_or_replaced(tmp_path: Path) -> None:
    proc, port = daemon(tmp_path)
    with proc:
        code, body = health(port)
        assert code == 200 and body["ok"] is True and body["socket"] == "ok", body
        os.unlink(proc.socket_path)  # processes now get FileNotFoundError
        code, body = health(port)
        assert code == 503 and body["ok"] is False and body["socket"] == "missing", body
        with socket.socket(socket.AF_UNIX) as other:  # another socket at the same path
            other.bind(str(proc.socket_path))
            code, body = health(port)
            assert code == 503 and body["socket"] == "replaced", body
        os.unlink(proc.socket_path)
    assert proc.proc is not None and proc.proc.returncode == 0


def test_healthz_says_what_is_wrong_with_the_config_files(tmp_path: Path) -> None:
    """A daemon without etcd publishes no status entries: its ``/healthz`` is where an
    invalid or unparsable config file shows (the daemon still serves its last good state:
    still ok)."""
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: 0.1\n")
    proc, port = daemon(tmp_path, extra=("--config", str(config)))

    def save(text: str) -> None:
        aside = tmp_path / "aside.yaml"
        aside.write_text(text)
        aside.replace(config)

    with proc:
        code, body = health(port)
        assert code == 200 and body["config_files"] == {}, body
        save("train:\n  lr: -1\n")
        body = wait_for(
            lambda: (b := health(port)[1])["config_files"] and b, "the rejection in /healthz"
        )
        assert body["ok"] is True
        assert (
            f"train.lr (from files: {config}): Input should be greater than 0"
            in (body["config_files"]["rejected"])
        )
        save("train: [unclosed\n")
        body = wait_for(
            lambda: "unreadable" in (b := health(port)[1])["config_files"] and b, "unreadable"
        )
        assert str(config) in body["config_files"]["unreadable"]
        save("train:\n  lr: 0.2\n")
        wait_for(lambda: health(port)[1]["config_files"] == {}, "fixed")


def test_an_edit_of_one_file_lands_while_another_is_unparsable_and_healthz_says_so(
    tmp_path: Path,
) -> None:
    """The unparsable file keeps its last good contents; an edit of the other file is
    applied meanwhile, and ``/healthz`` goes on naming the file that does not parse."""
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  lr: 0.05\n")
    b.write_text("sampling:\n  top_p: 0.9\n")
    proc, port = daemon(tmp_path, extra=("--config", str(a), "--config", str(b)))

    def save(target: Path, text: str) -> None:
        aside = tmp_path / "aside.yaml"
        aside.write_text(text)
        aside.replace(target)

    with proc:
        version = health(port)[1]["version"]
        save(b, "sampling: [unclosed\n")
        wait_for(lambda: "unreadable" in health(port)[1]["config_files"], "b unreadable")
        save(a, "train:\n  lr: 0.07\n")
        body = wait_for(lambda: (h := health(port)[1])["version"] > version and h, "a's edit")
        assert str(b) in body["config_files"]["unreadable"], body
        time.sleep(0.5)  # and it stays said
        assert str(b) in health(port)[1]["config_files"]["unreadable"]
        save(b, "sampling:\n  top_p: 0.5\n")
        wait_for(lambda: health(port)[1]["config_files"] == {}, "b fixed")


def test_a_restart_on_config_files_it_cannot_take_runs_them_as_they_were(
    tmp_path: Path,
) -> None:
    """A config file edited into something invalid while the daemon ran (refused, the last
    good contents in force), then the daemon restarted (its container, by a probe): it
    starts on the contents the files had as it ran them, says why in ``/healthz``, and
    takes the next valid save. The same for a file it cannot parse at all."""
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: 0.1\n")
    proc, port = daemon(tmp_path, extra=("--config", str(config)))
    with proc:
        pass  # its state file now holds the contents it ran
    for bad, problem, reason in (
        ("train:\n  lr: -1\n", "rejected", f"train.lr (from files: {config}): Input should be"),
        ("train: [unclosed\n", "unreadable", str(config)),
    ):
        config.write_text(bad)
        with proc:
            code, body = health(port)
            assert code == 200 and body["ok"] is True, body
            assert reason in body["config_files"][problem], body
            with RawClient(proc.socket_path) as client:
                assert client.snapshot["values"]["train"]["lr"] == 0.1
            event = "config_files_refused_at_start"
            if problem == "unreadable":
                event = "config_file_unreadable_at_start"
            assert proc.events(event), proc.log(since_start=True)
        assert proc.proc is not None and proc.proc.returncode == 0
    with proc, RawClient(proc.socket_path) as client:
        aside = tmp_path / "aside.yaml"
        aside.write_text("train:\n  lr: 0.3\n")
        aside.replace(config)
        assert client.next_update()["values"]["train"]["lr"] == 0.3
        wait_for(lambda: health(port)[1]["config_files"] == {}, "the files taken again")


def test_a_first_start_on_an_invalid_config_file_still_fails(tmp_path: Path) -> None:
    """No state file: nothing ran before, so nothing to start on instead."""
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: -1\n")
    proc, _ = daemon(tmp_path, extra=("--config", str(config)))
    with pytest.raises(RuntimeError, match="daemon exited with 1"):
        proc.start()
    assert f"train.lr (from files: {config}): Input should be greater than 0" in proc.log()
    other = tmp_path / "other.yaml"  # a state file of other files does not help either
    config.write_text("train:\n  lr: 0.1\n")
    with proc:
        pass
    other.write_text("train:\n  lr: -1\n")
    proc2, _ = daemon(tmp_path, extra=("--config", str(other)))
    with pytest.raises(RuntimeError, match="daemon exited with 1"):
        proc2.start()


# --- names: one per connection ---------------------------------------------------------------


def test_two_processes_with_one_name_keep_their_own_status_and_series(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    proc, port = daemon(tmp_path, endpoints=etcd.endpoint, extra=("--node", "n1"))
    status = f"/hotknob/{APP}/status/n1/"

    def entries() -> dict[str, dict[str, Any]]:
        out = etcd.etcdctl("get", "--prefix", status, "-w", "json").stdout
        kvs = json.loads(out).get("kvs", [])
        return {_b64(kv["key"]).removeprefix(status): json.loads(_b64(kv["value"])) for kv in kvs}

    def loss_series() -> dict[str, float]:
        prefix = "hotknob_client_metric{"
        return {k: v for k, v in samples(port).items() if k.startswith(prefix)}

    with (
        proc,
        RawClient(proc.socket_path, "trainer", pid=1111) as a,
        RawClient(proc.socket_path, "trainer", pid=2222) as b,
    ):
        for client, step, loss in ((a, 10, 0.1), (b, 99, 7.0)):
            client.send({"type": "applied", "version": 1, "step": step})
            client.send({"type": "metrics", "step": step, "latest": {"loss": loss}})
        wait_for(
            lambda: (
                {(n, e["pid"], e.get("step")) for n, e in entries().items()}
                == {("trainer", 1111, 10), ("trainer-2", 2222, 99)}
            ),
            "two status entries",
        )
        assert loss_series() == {
            'hotknob_client_metric{client="trainer",metric="loss"}': 0.1,
            'hotknob_client_metric{client="trainer-2",metric="loss"}': 7.0,
        }
        [renamed] = proc.events("client_renamed")
        assert renamed["requested"] == "trainer" and renamed["client"] == "trainer-2"
        a.close()  # the first to leave takes only its own entry and series
        wait_for(lambda: set(entries()) == {"trainer-2"}, "only the second one's entry")
        assert loss_series() == {'hotknob_client_metric{client="trainer-2",metric="loss"}': 7.0}
        assert entries()["trainer-2"]["pid"] == 2222
        # A third one under that name takes the first free one again.
        with RawClient(proc.socket_path, "trainer", pid=3333) as c:
            c.send({"type": "applied", "version": 1, "step": 5})
            wait_for(
                lambda: entries().get("trainer", {}).get("pid") == 3333,
                "the name freed taken again",
            )


def _b64(text: str) -> str:
    return base64.b64decode(text).decode()


# --- the address --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("[::1]:9108", ("::1", 9108)),
        ("::1:0", ("::1", 0)),
        ("[::]:0", ("::", 0)),
        (":9108", ("127.0.0.1", 9108)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_metrics_addr_forms(addr: str, expected: tuple[str, int]) -> None:
    assert parse_addr(addr) == expected


@pytest.mark.parametrize("addr", ["[::1]:0", "::1:0"])
def test_an_ipv6_metrics_addr_serves_and_the_bound_port_is_logged(
    tmp_path: Path, addr: str
) -> None:
    proc = DaemonProcess(tmp_path, app=APP, extra=["--metrics-addr", addr])
    with proc:
        [listening] = proc.events("metrics_listening")
        assert listening["host"] == "::1" and listening["port"] > 0, listening
        code, body = get(f"http://[::1]:{listening['port']}/healthz")
        assert code == 200 and json.loads(body)["ok"] is True


def test_the_port_chosen_for_port_zero_is_logged(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, app=APP, extra=["--metrics-addr", "127.0.0.1:0"])
    with proc:
        [listening] = proc.events("metrics_listening")
        assert listening["host"] == "127.0.0.1" and listening["port"] > 0
        assert health(listening["port"])[0] == 200


@pytest.mark.parametrize(
    ("addr", "says"),
    [
        ("127.0.0.1:99999", "--metrics-addr 127.0.0.1:99999: port must be 0 to 65535, got 99999"),
        ("no-such-host.invalid:9999", "--metrics-addr no-such-host.invalid:9999: cannot listen"),
    ],
)
def test_a_bad_metrics_addr_is_one_line_and_exit_2(tmp_path: Path, addr: str, says: str) -> None:
    sock = tmp_path / "s" / "t.sock"
    done = run_cli(
        "run", "--socket", str(sock), "--state-dir", str(tmp_path / "st"), "--metrics-addr", addr
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"hotknob: {says}"), done.stderr
    assert not sock.exists()


# --- etcd: resumes ----------------------------------------------------------------------------


def test_no_resume_is_counted_at_start_only_after_a_loss(etcd: EtcdServer, tmp_path: Path) -> None:
    proc, port = daemon(tmp_path, endpoints=etcd.endpoint)
    with proc:
        [ready] = proc.events("daemon_ready")
        assert ready["etcd"] is True  # the first snapshot came within the start
        wait_for(lambda: samples(port)["hotknob_etcd_connected"] == 1, "etcd connected")
        time.sleep(0.5)  # the watcher's first "up" has been handled by now
        assert samples(port)["hotknob_etcd_watch_resumes_total"] == 0
        assert not proc.events("etcd_reconnected")
        etcd.restart()
        wait_for(lambda: proc.events("etcd_reconnected"), "a reconnect after the restart", 30)
        assert samples(port)["hotknob_etcd_watch_resumes_total"] == 1
        # The daemon's own line (the watchers log theirs too, with their prefix).
        assert len([e for e in proc.events("etcd_disconnected") if "app" in e]) == 1


# --- who is counted ---------------------------------------------------------------------------


def test_watch_sessions_are_not_counted_as_processes(tmp_path: Path) -> None:
    proc, port = daemon(tmp_path)
    with proc:
        counted = ("hotknob_clients_connected", "hotknob_watchers_connected")

        def counts() -> tuple[float, ...]:
            values = samples(port)
            body = health(port)[1]
            return (*(values[name] for name in counted), body["clients"], body["watchers"])

        assert counts() == (0, 0, 0, 0)
        with (
            RawClient(proc.socket_path, "hotknob-watch", watch=True),
            RawClient(proc.socket_path, "hotknob-watch", watch=True),
            RawClient(proc.socket_path, "p1"),
        ):
            assert counts() == (1, 2, 1, 2)
        wait_for(lambda: counts() == (0, 0, 0, 0), "nobody counted once all left")


# --- the HTTP server's connections -------------------------------------------------------------


def test_an_idle_connection_to_the_metrics_port_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Shorter than the daemon's 10 s, for the test; raising=False: the attribute is the
    # knob this test is about.
    monkeypatch.setattr(metrics_module, "REQUEST_TIMEOUT_S", 0.5, raising=False)
    server = MetricsServer("127.0.0.1:0", Metrics(), lambda: {"ok": True})
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as idle:
            idle.settimeout(5)
            started = time.monotonic()
            try:
                data = idle.recv(1024)
            except TimeoutError:
                data = None
            assert data == b"", "an idle connection was kept open"
            assert time.monotonic() - started < 3
        assert health(server.port) == (200, {"ok": True})  # others are served as before
    finally:
        server.stop()


def test_the_default_request_timeout_is_ten_seconds() -> None:
    assert getattr(metrics_module, "REQUEST_TIMEOUT_S", None) == 10.0


# --- series there from the start ----------------------------------------------------------------


def test_change_counters_have_a_series_per_live_layer_from_the_start(tmp_path: Path) -> None:
    proc, port = daemon(tmp_path)
    with proc:
        values = samples(port)
    for counter in ("hotknob_changes_accepted_total", "hotknob_changes_rejected_total"):
        for layer in ("etcd", "files"):
            assert values.get(f'{counter}{{layer="{layer}"}}') == 0, (counter, layer)


def test_the_daemon_names_its_app_and_node(tmp_path: Path) -> None:
    """Two apps' daemons on one host, scraped by one job, are told apart by this series."""
    proc, port = daemon(tmp_path, extra=("--node", "gpu-07"))
    with proc:
        values = samples(port)
    assert values.get(f'hotknob_daemon_info{{app="{APP}",node="gpu-07"}}') == 1, values


def test_a_host_with_both_families_listens_on_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    """``localhost`` resolves to ::1 first on many hosts; a scraper set up with 127.0.0.1
    must still reach it, as it did before IPv6 hosts were supported."""
    from hotknob.daemon import metrics

    v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 9108, 0, 0))
    v4 = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 9108))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [v6, v4])
    assert metrics._resolve("localhost:9108", "localhost", 9108) == (socket.AF_INET, v4[4])
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [v6])
    assert metrics._resolve("[::1]:9108", "::1", 9108) == (socket.AF_INET6, v6[4])
