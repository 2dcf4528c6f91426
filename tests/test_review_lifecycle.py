"""The daemon's life as its operator meets it: its log, its metrics port, its socket path.

Real daemons in child processes, no etcd (the files layer carries the changes).
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli

pytestmark = pytest.mark.timeout(60)


def config(path: Path, lr: float) -> Path:
    path.write_text(f"train:\n  lr: {lr}\n")
    return path


def test_a_daemon_whose_log_reader_is_gone_keeps_serving_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    """stderr a pipe whose reader went away (a log collector that died, ``| head``): a
    log line that cannot be written must not stop the daemon, nor cut its stop short."""
    cfg = config(tmp_path / "c.yaml", 0.1)
    sock = tmp_path / "s" / "t.sock"
    state_dir = tmp_path / "st"
    proc = subprocess.Popen(
        hotknob_cmd(
            "run", "--app", "t", "--socket", str(sock), "--state-dir", str(state_dir),
            "--config", str(cfg),
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        while True:
            line = proc.stderr.readline()
            assert line, "the daemon ended before it was ready"
            if json.loads(line)["event"] == "daemon_ready":
                break
        with RawClient(sock) as client:
            proc.stderr.close()  # nobody reads the log any more
            config(cfg, 0.2)
            update = client.next_update()
            assert update["values"]["train"]["lr"] == 0.2
            config(cfg, 0.3)
            update = client.next_update()
            assert update["values"]["train"]["lr"] == 0.3
            assert proc.poll() is None
        with RawClient(sock) as again:  # a new process connects as usual
            assert again.snapshot["version"] == update["version"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = json.loads((state_dir / "t.state.json").read_text())
    assert saved["version"] == update["version"] and saved["clean"] is True
    assert not sock.exists()


def _hang_up_early(port: int) -> None:
    """A probe that sends its request and goes at once (reset), as one that timed out."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_probes_that_hang_up_early_leave_the_log_json_lines(tmp_path: Path) -> None:
    cfg = config(tmp_path / "c.yaml", 0.1)
    daemon = DaemonProcess(tmp_path, configs=[cfg], extra=["--metrics-addr", "127.0.0.1:0"])
    with daemon:
        (listening,) = daemon.events("metrics_listening")
        port = int(listening["port"])
        for _ in range(30):
            _hang_up_early(port)
        time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.status == 200 and json.load(answer)["ok"] is True
    log = daemon.log()
    not_json = []
    for line in log.splitlines():
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not not_json, f"{len(not_json)} lines not JSON, first: {not_json[:3]}"
    assert daemon.events("daemon_stopped")


def test_a_socket_path_too_long_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    """Said at once, before etcd is read and the state file written, not at the bind."""
    folder = tmp_path / ("x" * 120)
    state_dir = tmp_path / "st"
    result = run_cli(
        "run", "--app", "t", "--socket", str(folder / "t.sock"),
        "--state-dir", str(state_dir),
    )  # fmt: skip
    assert result.returncode == 1
    assert not state_dir.exists() and not folder.exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hotknob: the socket path ") and "longer than" in last
