"""Each command takes exactly the shared options it uses; any other is a usage error.

No etcd and no daemon: every case here is decided by the parser (or by a command
that needs neither), in this process.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hotknob.config import UsageError
from hotknob.daemon import cli

LAYERS = {"--schema", "--config", "--set", "--env-prefix", "--precedence"}
ETCD = {f"--etcd-{x}" for x in ("endpoints", "user", "password", "ca", "cert", "key", "timeout")}
DAEMON = {"--socket", "--state-dir", "--metrics-addr", "--log-level"}
SHARED = {"--app"} | LAYERS | ETCD | DAEMON

# What each handler reads (the contract this file pins down).
TAKES = {
    "run": SHARED,
    "get": {"--app"} | LAYERS | ETCD,
    "explain": {"--app"} | LAYERS | ETCD,
    "validate": {"--schema", "--precedence"},
    "set": {"--app"} | LAYERS | ETCD,
    "unset": {"--app"} | LAYERS | ETCD,
    "rollback": {"--app"} | LAYERS | ETCD,
    "history": {"--app", "--schema"} | ETCD,
    "status": {"--app", "--schema"} | ETCD,
    "watch": {"--app", "--socket"},
    "demo": ETCD,
}


@pytest.fixture(autouse=True)
def _no_hotknob_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOTKNOB_ETCD_ENDPOINTS", "HOTKNOB_SOCKET", "HOTKNOB_APP", "HOTKNOB_SCHEMA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "1000")  # help lines unwrapped, so phrases can be found


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(TAKES))
def test_help_lists_exactly_the_options_a_command_takes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = set(re.findall(r"--[a-z][a-z-]*", help_text(command, capsys))) & SHARED
    assert shown == TAKES[command], (
        f"offered but not taken: {sorted(shown - TAKES[command])}; "
        f"taken but not offered: {sorted(TAKES[command] - shown)}"
    )


def test_help_names_env_vars_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("run", capsys)
    for fragment in (
        "env HOTKNOB_APP, else 'default'",
        "env HOTKNOB_SCHEMA, else hotknob.config.schema:MLParams",
        "env HOTKNOB_SOCKET, else $XDG_RUNTIME_DIR/hotknob/<app>.sock",
        "env HOTKNOB_STATE_DIR, else $XDG_STATE_HOME/hotknob, else ~/.local/state/hotknob",
        "env HOTKNOB_METRICS_ADDR; default: not served",
        "default: HOTKNOB_PARAM_",
        "--env-prefix MY_ reads MY_TRAIN__LR",
        "(default: info)",
        "env HOTKNOB_ETCD_ENDPOINTS",
    ):
        assert fragment in text, fragment


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["validate", "--set", "train.lr=-1", "{ok}"], "--set"),
        (["validate", "--config", "{ok}", "{ok}"], "--config"),
        (["validate", "--etcd-endpoints", "127.0.0.1:1", "{ok}"], "--etcd-endpoints"),
        (["get", "--state-dir", "X", "train.lr"], "--state-dir"),
        (["get", "--metrics-addr", "bogus", "train.lr"], "--metrics-addr"),
        (["get", "--socket", "/nonexistent", "train.lr"], "--socket"),
        (["explain", "--log-level", "debug"], "--log-level"),
        (["status", "--socket", "/nonexistent"], "--socket"),
        (["status", "--config", "{ok}"], "--config"),
        (["history", "--set", "train.lr=1"], "--set"),
        (["watch", "--config", "{ok}", "--socket", "/nonexistent"], "--config"),
        (["watch", "--etcd-endpoints=127.0.0.1:1", "--socket", "/nonexistent"], "--etcd-endpoints"),
    ],
)
def test_an_option_a_command_does_not_take_is_a_usage_error(
    argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = tmp_path / "ok.toml"
    ok.write_text("[train]\nlr = 0.01\n")
    code = cli.main([arg.replace("{ok}", str(ok)) for arg in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.strip() == (
        f"hotknob: {argv[0]}: {flag} is not an option of this command "
        f"(see hotknob {argv[0]} --help)"
    )
    assert not out


@pytest.mark.parametrize(
    "extra",
    [
        ["--app", "mine"],
        ["--config", "c.yaml"],
        ["--set", "train.lr=1"],
        ["--schema", "x:Y"],
        ["--socket", "/tmp/s.sock"],
        ["--state-dir", "/tmp/st"],
        ["--env-prefix", "MY_"],
    ],
)
def test_demo_refuses_what_it_does_not_honour(extra: list[str]) -> None:
    # Parsed only: the demo itself is not started.
    with pytest.raises(UsageError, match=re.escape(extra[0])):
        cli.build_parser().parse_args(["demo", *extra])


def test_demo_takes_the_etcd_options() -> None:
    args = cli.build_parser().parse_args(
        ["demo", "--etcd-endpoints", "h:1", "--etcd-user", "u", "--etcd-timeout", "2"]
    )
    assert (args.etcd_endpoints, args.etcd_user, args.etcd_timeout) == ("h:1", "u", 2.0)


def test_the_options_a_command_takes_still_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = -1\n")
    assert cli.main(["validate", "--schema", "hotknob.config.schema:MLParams", str(bad)]) == 1
    assert "train.lr" in capsys.readouterr().out
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 0.5\n")
    argv = ["get", "train.lr", "--config", str(config), "--set", "train.momentum=0.1"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == "0.5"


def test_an_unknown_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--log-level", "loud", "--socket", "/nonexistent/s.sock"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hotknob: run: argument --log-level: invalid choice: 'loud'"), err


def test_an_unknown_option_is_still_unrecognized(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", "--nope"]) == 2
    assert capsys.readouterr().err.strip() == "hotknob: unrecognized arguments: --nope"
