"""Found by driving ``LiveConfig`` against a real daemon: connect's edges.

Each test failed before its fix (``model_runtime/client.py``, ``connection.py``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hotknob.model_runtime import DaemonUnavailable, LiveConfig, protocol

from .daemon_proc import DaemonProcess


def write_config(path: Path, lr: float) -> None:
    """Write-then-rename, as an editor does: the daemon never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"train:\n  lr: {lr}\n")
    os.replace(tmp, path)


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def live_config_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("hotknob-live-config")]


@pytest.mark.parametrize(
    "hello",
    [
        {"client": "x" * 300},  # the daemon takes names of at most 256 characters
        {"protocol": 2},  # an extra field that overrides the protocol
        {"pid": "abc"},
        {"team": object()},  # JSON cannot carry it: the hello could not be sent at all
        {"notes": "y" * (protocol.MAX_LINE_BYTES + 1)},  # over the line limit
    ],
    ids=["long-client", "protocol", "pid", "unencodable", "too-large"],
)
def test_a_hello_the_daemon_would_refuse_is_refused_at_once(
    tmp_path: Path, hello: dict[str, Any]
) -> None:
    """Such a hello was sent (or failed to encode, with a traceback in the log) at every
    reconnect, and ``connect`` waited out its whole timeout to say "no hotknob daemon at
    PATH" of a daemon that was there and refused it."""
    config = tmp_path / "c.yaml"
    write_config(config, 0.1)
    with DaemonProcess(tmp_path, configs=[config]) as daemon:
        started = time.monotonic()
        with pytest.raises(ValueError, match="hello"):
            LiveConfig.connect(daemon.socket_path, timeout=4, **hello)
        assert time.monotonic() - started < 1.0
        assert not daemon.events("client_error", "client_connected")
    assert not live_config_threads()


def test_an_interrupted_connect_leaves_no_client_behind(tmp_path: Path) -> None:
    """Ctrl-C (here an alarm's exception) while ``connect`` waited for a daemon left its
    thread running: once a daemon came up, that client connected, was listed by the
    daemon, and never applied anything (``set --wait`` would wait on it)."""
    daemon = DaemonProcess(tmp_path)

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            LiveConfig.connect(daemon.socket_path, timeout=10, client="interrupted")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not live_config_threads()
    with daemon:
        time.sleep(1.0)  # longer than the client's longest backoff after its first tries
        assert not daemon.events("client_connected")


def test_a_relative_socket_path_reaches_a_restarted_daemon_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative ``socket=`` (or ``HOTKNOB_SOCKET``) was looked up anew at each reconnect:
    a run that moved into its output folder after connecting never found its daemon
    again once that restarted ("No such file or directory")."""
    config = tmp_path / "c.yaml"
    write_config(config, 0.1)
    daemon = DaemonProcess(tmp_path, configs=[config]).start()
    try:
        monkeypatch.chdir(tmp_path)
        relative = os.path.relpath(daemon.socket_path)
        with LiveConfig.connect(relative, timeout=5) as live:
            assert live.socket_path == str(daemon.socket_path)
            (tmp_path / "out").mkdir()
            monkeypatch.chdir(tmp_path / "out")
            daemon.stop()
            daemon.start()
            write_config(config, 0.2)
            assert wait_until(lambda: live.pending_version != live.version), live._conn.last_error
            assert live.apply(1) is True and live["train.lr"] == 0.2
    finally:
        daemon.stop()


def test_connect_says_why_the_daemon_closed_the_connection(sock_path: str) -> None:
    """A daemon that answers the hello with an ``error`` and closes (a uid it does not
    allow): ``connect``'s message said "the daemon closed the connection" and lost the
    reason the daemon gave. Later it said "no hotknob daemon at PATH: start one with
    `hotknob run`" of a daemon that was there (one whose state is over a protocol line
    answers so too): starting a second one would not help."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(8)
    listener.settimeout(0.2)
    done = threading.Event()

    def refuse_every_hello() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                conn.recv(65536)  # the hello
                conn.sendall(
                    json.dumps(protocol.error("uid 1234 may not use this socket")).encode()
                )
                conn.sendall(b"\n")

    server = threading.Thread(target=refuse_every_hello)
    server.start()
    try:
        with pytest.raises(DaemonUnavailable) as refused:
            LiveConfig.connect(sock_path, timeout=1)
    finally:
        done.set()
        server.join()
        listener.close()
    said = "uid 1234 may not use this socket"
    assert str(refused.value) == (
        f"the hotknob daemon at {sock_path} sent no state within 1 s; it said: {said}"
    )


def test_on_change_warns_of_a_key_the_values_do_not_have(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``on_change("train.lrr", ...)``, a typo, never fired, and nothing said so."""
    from tests.daemon_stub import DaemonStub

    values = {"train": {"lr": 0.001}, "tags": {}}
    with (
        DaemonStub(str(tmp_path / "s.sock"), values) as stub,
        LiveConfig.connect(stub.path, timeout=5, client="typo") as live,
    ):
        caplog.clear()
        for key in ("train.lr", "train", "tags"):
            live.on_change(key, lambda new: None)
        assert "live_on_change_unknown_key" not in caplog.text
        live.on_change("train.lrr", lambda new: None)
        assert "live_on_change_unknown_key key=train.lrr" in caplog.text
