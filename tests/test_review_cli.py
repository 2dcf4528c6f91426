"""The CLI as a whole, as a user at a terminal meets it: Ctrl-C at any moment exits 130
quietly, and what etcd holds (a key any client may have written) never sends a newline or
an escape sequence to the terminal, in ``watch``'s lines, in a warning or in an error.

Real etcd, a real daemon, and the CLI in child processes as a user runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess, hotknob_cmd, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(60)

APP = "t"
P = f"/hotknob/{APP}/config/"
ESC = "\x1b"
# A key written around hotknob whose name clears the screen and starts a new line.
STRAY = f"tr{ESC}[2Jain\nx/lr"


def _plain(text: str) -> None:
    """``text`` carries no escape sequence, and every line of it is one of hotknob's."""
    assert ESC not in text, text
    for line in text.splitlines():
        assert line.startswith("hotknob: "), (line, text)


# --- Ctrl-C while the CLI loads ----------------------------------------------------------------

# Python's SIGINT sent to the process itself just as the CLI's modules import pydantic: the
# moment a user's Ctrl-C lands in the first third of a second of any command.
_INTERRUPT_WHILE_LOADING = """
import builtins, os, signal, sys
real_import = builtins.__import__
def interrupting_import(name, *args, **kwargs):
    if name == "pydantic":
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupting_import
sys.argv = ["hotknob", "get", "train.lr"]
from hotknob.daemon.cli import main
sys.exit(main())
"""


def test_ctrl_c_while_the_cli_loads_exits_130_without_a_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTKNOB_")}
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_WHILE_LOADING],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 130, (done.returncode, done.stderr[-2000:])
    assert done.stderr == "" and done.stdout == ""


# --- what etcd holds reaches no terminal raw -----------------------------------------------------


def test_a_warning_about_an_etcd_key_is_one_line_with_no_escape(etcd: EtcdServer) -> None:
    etcd.etcdctl("put", P + STRAY, "1")
    common = ("--app", APP, "--etcd-endpoints", etcd.endpoint)
    for args in (("get", "train.lr"), ("set", "train.lr=0.5")):
        done = run_cli(*args, *common)
        assert done.returncode == 0, (args, done.stderr)
        _plain(done.stderr)
        assert "tr\\x1b[2Jain\\nx.lr" in done.stderr, done.stderr
    # a status entry written around hotknob, not JSON: skipped, and said so on one line
    etcd.etcdctl("put", f"/hotknob/{APP}/status/n1/{STRAY}", "not json")
    done = run_cli("status", *common)
    assert done.returncode == 0, done.stderr
    _plain(done.stderr)
    assert "skipping status entry n1/tr\\x1b[2Jain\\nx/lr" in done.stderr, done.stderr


def test_an_error_quoting_a_key_is_one_line_with_no_escape() -> None:
    done = run_cli("get", f"a{ESC}[2Jb", "--app", APP, drop="HOTKNOB_")
    assert done.returncode == 1, done.stderr
    _plain(done.stderr)
    assert done.stderr == "hotknob: a\\x1b[2Jb: not a key of the schema\n"


def test_watch_shows_an_event_about_an_etcd_key_on_one_line(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint) as daemon:
        watch = subprocess.Popen(
            hotknob_cmd("watch", "--app", APP, "--socket", str(daemon.socket_path), "--count", "1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert watch.stdout is not None
            assert watch.stdout.readline().startswith(f"watching {APP}: ")  # connected
            etcd.etcdctl("put", P + STRAY, "1")
            out, err = watch.communicate(timeout=30)
        finally:
            if watch.poll() is None:
                watch.send_signal(signal.SIGINT)
                watch.communicate(timeout=10)
    assert watch.returncode == 0, err
    assert ESC not in out and err == "", (out, err)
    lines = out.splitlines()
    assert len(lines) == 1, lines
    assert "REJECTED" in lines[0] and "tr\\x1b[2Jain\\nx.lr" in lines[0], lines


# --- --help ------------------------------------------------------------------------------------


def test_watch_help_names_the_count_it_describes(capsys: pytest.CaptureFixture[str]) -> None:
    """``--count N``: the N its help speaks of, as ``history --limit N`` and ``demo --steps
    N`` write it, and its default said as every other option's is."""
    from hotknob.daemon import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["watch", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--count N " in out and "COUNT" not in out, out
    assert "exit after N events (default 0: until Ctrl-C)" in " ".join(out.split()), out
