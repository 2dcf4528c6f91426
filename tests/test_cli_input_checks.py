"""The app name and the etcd endpoints are checked before any command does anything.

An app name is a path segment of the etcd keys and names the socket and the state
file: ``../x`` wrote a state file outside ``--state-dir``, ``''`` a hidden
``.state.json``. A malformed endpoint (``::::``, ``host:port:extra``) read as an
etcd that is down: ``hotknob run`` served its last-known-good state and retried
forever. Both are usage errors now (exit 2, one line), for every command. And a
failed ``run`` that logs JSON lines says so as a JSON event too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hotknob.config import UsageError
from hotknob.daemon import cli
from hotknob.daemon.etcd_types import EtcdOptions, parse_endpoint

pytestmark = pytest.mark.timeout(60)

APP_RULE = (
    "an app name is 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
)
ENDPOINT_FORMS = "(want host:port, [ipv6]:port or http(s)://host:port)"
# The commands that take --app, each with what it needs to get past its own parsing.
APP_COMMANDS = [
    ["get", "train.lr"],
    ["explain"],
    ["set", "train.lr=0.5"],
    ["unset", "train.lr"],
    ["rollback", "--to-revision", "1"],
    ["history"],
    ["status"],
    ["watch"],
]
ETCD_COMMANDS = [c for c in APP_COMMANDS if c[0] != "watch"]


@pytest.fixture(autouse=True)
def _no_hotknob_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("HOTKNOB_"):
            monkeypatch.delenv(name)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTKNOB_")}
    env.update(extra)
    return env


def _hotknob(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process, stderr a pipe (so ``run`` logs JSON lines)."""
    return subprocess.run(
        [sys.executable, "-m", "hotknob.daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env if env is not None else _env(),
        stdin=subprocess.DEVNULL,
    )


def _one_line(code: int, capsys: pytest.CaptureFixture[str], got: int) -> str:
    out, err = capsys.readouterr()
    assert got == code, (got, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out
    return lines[0]


# --- app names ---------------------------------------------------------------------------------

VALID_APPS = ["default", "demo", "mytrain", "myjob", "t", "demo-1a2b3c4d", "a.b_c-D9", "x" * 100]
INVALID_APPS = ["../x", "", "a/b", "/abs", ".hidden", "-flag", "_x", "a b", "a\nb", "é", "x" * 101]


@pytest.mark.parametrize("name", VALID_APPS)
def test_the_app_names_the_docs_use_are_valid(name: str) -> None:
    from hotknob.daemon.context import check_app_name

    assert check_app_name(name) == name


@pytest.mark.parametrize("name", INVALID_APPS)
def test_an_app_name_that_could_leave_its_folder_is_refused(name: str) -> None:
    from hotknob.daemon.context import check_app_name

    with pytest.raises(UsageError, match="an app name is 1 to 100"):
        check_app_name(name)


@pytest.mark.parametrize("command", APP_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("name", ["../x", "", "a/b"])
def test_every_command_refuses_a_bad_app_name(
    command: list[str], name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [command[0], "--app", name, *command[1:]]
    if command[0] == "watch":
        argv += ["--socket", str(tmp_path / "none.sock")]
    line = _one_line(2, capsys, cli.main(argv))
    assert line == f"hotknob: invalid app name {name!r} (--app or HOTKNOB_APP): {APP_RULE}"


def test_a_valid_app_name_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", "--app", "my.train_job-2", "train.lr"]) == 0
    assert capsys.readouterr().out.strip() == "0.001"


@pytest.mark.parametrize("name", ["../x", ""])
def test_run_with_a_bad_app_name_writes_nothing(name: str, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    done = _hotknob(
        "run", "--app", name, "--socket", str(work / "sock" / "s.sock"),
        "--state-dir", str(work / "state"),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"hotknob: invalid app name {name!r} (--app or HOTKNOB_APP): {APP_RULE}"
    )
    assert list(tmp_path.rglob("*")) == [work]  # no state file, no socket, anywhere


# --- etcd endpoints ----------------------------------------------------------------------------

GOOD_ENDPOINTS = [
    ("127.0.0.1:2379", ("127.0.0.1", 2379, None)),
    ("etcd-0.etcd.svc:2380", ("etcd-0.etcd.svc", 2380, None)),
    ("m0", ("m0", 2379, None)),
    ("[::1]:4000", ("::1", 4000, None)),
    ("[::1]", ("::1", 2379, None)),
    ("http://etcd:2379", ("etcd", 2379, False)),
    ("https://etcd", ("etcd", 2379, True)),
    ("HTTPS://etcd.example.com.:2379/", ("etcd.example.com.", 2379, True)),
    ("http://[fd00::5]:2379", ("fd00::5", 2379, False)),
]
BAD_ENDPOINTS = [
    ("::::", "more than one ':'"),
    ("host:2379:extra", "more than one ':'"),
    ("host:notaport", "the port 'notaport' is not a number from 1 to 65535"),
    (":2379", "no host"),
    ("http://:2379", "no host"),
    ("::1", "an IPv6 address needs brackets, as in [::1]:2379"),
    ("[::1", "no ']' after the IPv6 address"),
    ("[nope]:1", "'nope' is not an IPv6 address"),
    ("[::1]x", "'x' after the address"),
    ("host:", "the port '' is not a number from 1 to 65535"),
    ("host:0", "the port '0' is not a number from 1 to 65535"),
    ("host:65536", "the port '65536' is not a number from 1 to 65535"),
    ("host:+5", "the port '+5' is not a number from 1 to 65535"),
    ("a b:1", "'a b' is not a host name or address"),
    ("user@host:1", "'user@host' is not a host name or address"),
    ("http://a/b:1", "'a/b' is not a host name or address"),
]


@pytest.mark.parametrize(("text", "parsed"), GOOD_ENDPOINTS)
def test_the_endpoint_forms_in_use_still_parse(text: str, parsed: tuple[str, int, bool]) -> None:
    assert parse_endpoint(text) == parsed


@pytest.mark.parametrize(("text", "why"), BAD_ENDPOINTS)
def test_a_malformed_endpoint_is_a_usage_error(text: str, why: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_endpoint(text)
    assert str(raised.value) == f"malformed etcd endpoint {text!r}: {why} {ENDPOINT_FORMS}"
    with pytest.raises(UsageError):
        EtcdOptions.from_strings(f"127.0.0.1:2379,{text}")


@pytest.mark.parametrize("command", ETCD_COMMANDS, ids=lambda c: c[0])
def test_every_command_refuses_a_malformed_endpoint(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command[0], "--etcd-endpoints", "127.0.0.1:1,::::", *command[1:]]
    line = _one_line(2, capsys, cli.main(argv))
    assert line == f"hotknob: malformed etcd endpoint '::::': more than one ':' {ENDPOINT_FORMS}"


@pytest.mark.parametrize(
    "variable, value, start",
    [
        ("HOTKNOB_APP", "../../etc", "invalid app name '../../etc' (--app or HOTKNOB_APP)"),
        ("HOTKNOB_ETCD_ENDPOINTS", "etcd:2379:2380", "malformed etcd endpoint 'etcd:2379:2380'"),
    ],
)
def test_a_bad_value_from_the_environment_is_refused(
    variable: str,
    value: str,
    start: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)
    line = _one_line(2, capsys, cli.main(["get", "train.lr"]))
    assert line.startswith(f"hotknob: {start}")


def test_run_refuses_a_malformed_endpoint_instead_of_waiting_for_etcd(tmp_path: Path) -> None:
    """Before, ``run`` started, served its last-known-good state and retried forever."""
    try:
        done = _hotknob(
            "run", "--app", "t", "--socket", str(tmp_path / "sock" / "t.sock"),
            "--state-dir", str(tmp_path / "state"), "--etcd-endpoints", "::::",
            "--etcd-start-timeout", "1",
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("hotknob run took '::::' for an etcd that is down, and kept running")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"hotknob: malformed etcd endpoint '::::': more than one ':' {ENDPOINT_FORMS}"
    )
    assert "daemon_ready" not in done.stderr
    assert not (tmp_path / "state").exists()


def test_demo_refuses_a_malformed_endpoint_before_it_starts(tmp_path: Path) -> None:
    try:
        done = _hotknob("demo", "--etcd-endpoints", "host:2379:extra")
    except subprocess.TimeoutExpired:
        pytest.fail("hotknob demo took 'host:2379:extra' for an etcd")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""  # it started nothing: no working folder, no etcd
    assert done.stderr.strip() == (
        f"hotknob: malformed etcd endpoint 'host:2379:extra': more than one ':' {ENDPOINT_FORMS}"
    )


# --- a failed start, logged as JSON --------------------------------------------------------------


def _json_lines(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--config", "{missing}"], 1, "{missing}: no such file"),
        (["--app", "../x"], 2, "invalid app name '../x'"),
        (["--etcd-endpoints", "h:1:2"], 2, "malformed etcd endpoint 'h:1:2'"),
    ],
    ids=["missing-config", "bad-app", "bad-endpoint"],
)
def test_a_failed_start_is_also_a_json_event_when_run_logs_json(
    args: list[str], code: int, says: str, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.yaml")
    args = [a.replace("{missing}", missing) for a in args]
    says = says.replace("{missing}", missing)
    done = _hotknob(
        "run", "--socket", str(tmp_path / "sock" / "t.sock"), "--state-dir",
        str(tmp_path / "state"), *args,
    )  # fmt: skip
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"hotknob: {says}"), done.stderr  # the plain line, still last
    failed = [e for e in _json_lines(done.stderr) if e.get("event") == "daemon_start_failed"]
    assert len(failed) == 1, done.stderr
    assert failed[0]["error"] == lines[-1].removeprefix("hotknob: ")
    assert failed[0]["exit_code"] == code and failed[0]["level"] == "critical"
    assert json.loads(lines[-2]) == failed[0]  # just before the plain line
    assert "Traceback" not in done.stderr


def test_another_command_adds_no_json_line(tmp_path: Path) -> None:
    done = _hotknob("get", "--config", str(tmp_path / "missing.yaml"), "train.lr")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"hotknob: {tmp_path / 'missing.yaml'}: no such file"
    ]
