"""The README's and docs/protocol.md's newer claims, run as a user runs them: real etcd,
real daemons, the CLI. Each test quotes the claim it pins."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import wait_for

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "protocol.md"
FILES_ABOVE = "defaults,etcd,files,env,cli"
UNDER_FILES = (
    "(shadowed by the config files, which lie above etcd in --precedence: it would take "
    "effect once the files no longer set that key)"
)


def _watch(daemon: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    command = hotknob_cmd("watch", "--app", daemon.app, "--socket", str(daemon.socket_path))
    return subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 15.0) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def _watching(daemon: DaemonProcess, count: int) -> None:
    """Wait for ``count`` watchers to be connected: an event before that is not theirs."""
    wait_for("the watchers to connect", lambda: len(daemon.events("client_connected")) >= count)


def test_set_says_why_it_refuses_an_etcd_value_the_files_shadow(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """README: with the files above etcd, "an etcd value the files shadow is refused as it
    comes if it would be refused once the files drop its key, by the daemon as by `set`".
    The daemon said why (the files shadow it); `set` gave the bare reason, for a value whose
    merged configuration is valid."""
    conf = tmp_path / "c.yaml"
    conf.write_text("train:\n  lr: 0.1\n")
    layers = ["--precedence", FILES_ABOVE, "--config", str(conf)]
    with DaemonProcess(
        tmp_path / "d", app="above", endpoints=etcd.endpoint, configs=[conf], extra=layers[:2]
    ) as daemon:
        etcd.etcdctl("put", "--", "/hotknob/above/config/train/lr", "-1")
        (event,) = wait_for("the refusal", lambda: daemon.events("change_rejected"))
    assert event["reason"].endswith(UNDER_FILES)
    done = run_cli(
        "set", "--app", "above", "--etcd-endpoints", etcd.endpoint, *layers, "train.lr=-2"
    )
    assert done.returncode == 1
    assert "train.lr (from etcd): Input should be greater than 0 " + UNDER_FILES in done.stderr


def test_set_names_the_variable_or_set_that_shadows_a_refused_value(etcd: EtcdServer) -> None:
    """A value an env var or `--set` shadows is "checked all the same": the refusal says
    that it is shadowed, and by what, where it gave the bare reason."""
    common = ("set", "--app", "shadowed", "--etcd-endpoints", etcd.endpoint)
    env = run_cli(*common, "train.lr=-1", env={"HOTKNOB_PARAM_TRAIN__LR": "0.2"}, drop="HOTKNOB_")
    assert env.returncode == 1
    assert "(shadowed by an environment variable: it would take effect" in env.stderr
    cli = run_cli(*common, "--set", "train.lr=0.2", "train.lr=-1", drop="HOTKNOB_")
    assert cli.returncode == 1 and "(shadowed by --set: it would take effect" in cli.stderr
    plain = run_cli(*common, "train.lr=-1", drop="HOTKNOB_")
    assert plain.returncode == 1 and "shadowed" not in plain.stderr


def test_a_long_rejection_is_counted_in_unlisted_as_protocol_md_says(tmp_path: Path) -> None:
    """README: "a rejection names its first 100 problems and counts the rest, `--json`:
    `"unlisted": {"problems": N, "keys": M}`". docs/protocol.md's `change_rejected` named
    no `unlisted`, so a client written from it did not know the event was cut."""
    (bullet,) = re.findall(r"^- `change_rejected`:.*?(?=^- )", PROTOCOL.read_text(), re.M | re.S)
    assert "`unlisted`" in bullet and '"problems"' in bullet and '"keys"' in bullet
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"train": {"lr": 0.1}}))
    with DaemonProcess(tmp_path / "d", app="cut", configs=[conf]) as daemon:
        watchers = [_watch(daemon, "--count", "1", *flags) for flags in ([], ["--json"])]
        _watching(daemon, 2)
        unknown = {f"knob_{i:03d}": 1 for i in range(150)}
        (tmp_path / "c.tmp").write_text(json.dumps({"train": {"lr": 0.1}, **unknown}))
        (tmp_path / "c.tmp").rename(conf)
        (rc_text, text, _), (rc_json, lines, _) = (_finish(w) for w in watchers)
    assert rc_text == 0 and rc_json == 0
    assert "REJECTED" in text and text.rstrip().endswith("; and 50 more")
    event = json.loads(lines.splitlines()[-1])
    assert event["event"] == "change_rejected" and len(event["problems"]) == 100
    assert event["unlisted"] == {"problems": 50, "keys": 50} and len(event["new"]) == 100


def test_watch_counts_the_keys_of_a_change_too_large_for_a_line(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """README: "an accepted change too large for one line of the protocol lists the keys
    that fit and counts the rest the same way, `and M more keys`"."""

    def sections(base: int) -> dict[str, dict[str, int]]:
        return {f"{'s' * 150}{i:03d}": {f"x{j}": base + j for j in range(10)} for i in range(400)}

    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps(sections(100)))
    extra = ["--schema", "tests.test_review_large:Narrower"]
    with DaemonProcess(
        tmp_path / "d", app="wide", endpoints=etcd.endpoint, configs=[conf], extra=extra
    ) as daemon:
        watcher = _watch(daemon, "--count", "1")
        _watching(daemon, 1)
        (tmp_path / "conf.tmp").write_text(json.dumps(sections(200)))
        (tmp_path / "conf.tmp").rename(conf)
        rc, out, err = _finish(watcher)
    assert rc == 0, err
    line = out.splitlines()[-1]
    listed = line.count(" (was ")
    more = re.search(r" and (\d+) more keys$", line)
    assert more is not None and listed and listed + int(more.group(1)) == 4000


def test_watch_and_connect_refuse_another_apps_daemon(tmp_path: Path) -> None:
    """protocol.md, `app`: a client that asked for an app refuses a daemon of another one:
    `connect` raises `ValueError` at once, and `watch` exits 1."""
    with DaemonProcess(tmp_path, app="ab") as daemon:
        with RawClient(daemon.socket_path) as raw:
            assert raw.snapshot["app"] == "ab"
        done = run_cli("watch", "--app", "a", "--socket", str(daemon.socket_path), drop="HOTKNOB_")
        code = (
            "from hotknob.model_runtime import LiveConfig\n"
            f"LiveConfig.connect(socket={str(daemon.socket_path)!r}, app='a', timeout=5)\n"
        )
        client = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    assert "serves app 'ab', not 'a'" in done.stderr
    assert client.returncode == 1 and "ValueError" in client.stderr
    assert "serves app 'ab', not 'a'" in client.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--node", "x/y"],
        ["run", "--node", "../.."],
        ["run", "--node", "a" * 254],
        ["get", "--precedence", "etcd,defaults,files,env,cli"],
    ],
)
def test_a_bad_node_or_order_is_a_usage_error(args: list[str]) -> None:
    """README: `--node` is "1 to 253 letters, digits, `.`, `_` or `-`, starting with a letter
    or digit (else a usage error, exit 2)"; `--precedence` has "`defaults` always first"."""
    done = run_cli(*args, "--app", "usage", drop="HOTKNOB_")
    assert done.returncode == 2
    assert "a node name is 1 to 253" in done.stderr or "must start with defaults" in done.stderr


def test_watch_refuses_another_apps_daemon_at_a_reconnect(tmp_path: Path) -> None:
    """README, `watch`: a daemon of another app than the one named "is refused, at the
    start or at a reconnect ... exit 1; with a socket and no app named, the daemon's own
    app is watched"."""
    sock = tmp_path / "s.sock"

    def daemon(app: str) -> DaemonProcess:
        (tmp_path / app).mkdir()
        proc = DaemonProcess(tmp_path / app, app=app)
        proc.socket_path = sock
        proc.args[proc.args.index("--socket") + 1] = str(sock)
        return proc

    first = daemon("a").start()
    try:
        named = _watch(first)
        _watching(first, 1)
    finally:
        first.stop()
    with daemon("ab"):
        rc, out, err = _finish(named)
        unnamed = subprocess.Popen(
            hotknob_cmd("watch", "--socket", str(sock)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("HOTKNOB_")},
        )
        assert unnamed.stdout is not None
        said = unnamed.stdout.readline()
        unnamed.kill()
        _finish(unnamed)
    assert rc == 1 and "lost the daemon" in out
    assert "serves app 'ab', not 'a'" in err
    assert said.startswith("watching ab: version 1")
