"""Review of the logs an operator reads: what the runtime logs of a failed callback or
binding never shows a secret's value, and ``--log-level`` holds for a library's lines too."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from hotknob.model_runtime import protocol
from hotknob.model_runtime.hooks import Hooks
from hotknob.model_runtime.received import State
from tests.daemon_proc import DaemonProcess, RawClient

pytestmark = pytest.mark.timeout(60)

OLD_SECRET = "old-api-key-Zq81xw"
NEW_SECRET = "new-api-key-Pk27vb"
SECRET_SHOWN = "**********"  # as the daemon shows a secret


class _Lines(logging.Handler):
    """Every record of the runtime's logger, formatted as a plain handler writes it
    (traceback included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))


@pytest.fixture
def runtime_log() -> Iterator[_Lines]:
    logger = logging.getLogger("hotknob.model_runtime")
    handler = _Lines()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _states() -> tuple[State, State]:
    old = State.build(1, 1, {"train": {"lr": 0.1}, "service": {"api_key": OLD_SECRET}})
    new = State.build(2, 2, {"train": {"lr": 0.2}, "service": {"api_key": NEW_SECRET}})
    return old, new


def _assert_hidden(said: str) -> None:
    assert OLD_SECRET not in said and NEW_SECRET not in said, said


def test_a_callback_quoting_a_secret_logs_and_reports_it_masked(runtime_log: _Lines) -> None:
    hooks = Hooks()
    hooks.secret = frozenset({"service.api_key"})

    def authenticate(section: Mapping[str, Any]) -> None:
        raise RuntimeError(f"auth failed with {section['api_key']}")

    def reconnect(key: str, before: str) -> None:
        raise ValueError(f"cannot swap {before!r} for {key!r}")

    hooks.on_change("service", authenticate)
    hooks.on_change("service.api_key", reconnect)
    old, new = _states()
    errors = hooks.run(old, new)
    said = "\n".join(runtime_log.text)
    _assert_hidden(said)
    _assert_hidden(repr(errors))
    # Still an error with its key, version, exception type and frames.
    assert said.count("ERROR live_callback_failed") == 2
    assert "key=service version=2" in said and "key=service.api_key version=2" in said
    assert "in authenticate" in said and "RuntimeError: auth failed with " + SECRET_SHOWN in said
    assert errors[0] == {
        "key": "service",
        "error": f"RuntimeError: auth failed with {SECRET_SHOWN}",
    }
    assert errors[1]["key"] == "service.api_key" and SECRET_SHOWN in errors[1]["error"]


def test_a_binding_quoting_a_secret_logs_and_reports_it_masked(runtime_log: _Lines) -> None:
    hooks = Hooks()
    hooks.secret = frozenset({"service.api_key"})

    class Client:
        def apply(self, values: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
            raise PermissionError(f"token {values['service.api_key']} refused")

    hooks.add_binding(Client())
    old, new = _states()
    errors = hooks.run(old, new)
    said = "\n".join(runtime_log.text)
    _assert_hidden(said)
    _assert_hidden(repr(errors))
    assert "ERROR live_binding_failed binding=Client version=2" in said
    assert errors == [
        {"binding": "Client", "error": f"PermissionError: token {SECRET_SHOWN} refused"}
    ]


def test_a_failure_quoting_no_secret_keeps_its_exception_for_the_handler(
    runtime_log: _Lines,
) -> None:
    hooks = Hooks()
    hooks.secret = frozenset({"service.api_key"})
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logger = logging.getLogger("hotknob.model_runtime")
    logger.addHandler(keep)
    try:

        def lr_changed(value: float) -> None:
            raise ArithmeticError(f"lr {value} too big")

        hooks.on_change("train.lr", lr_changed)
        old, new = _states()
        errors = hooks.run(old, new)
    finally:
        logger.removeHandler(keep)
    assert errors == [{"key": "train.lr", "error": "ArithmeticError: lr 0.2 too big"}]
    (record,) = records
    assert record.exc_info is not None and isinstance(record.exc_info[1], ArithmeticError)


def test_log_level_error_drops_a_library_s_warning_as_it_drops_the_daemon_s() -> None:
    # ``hotknob run --log-level error`` left out the daemon's own warnings but still wrote
    # grpc's and watchdog's. A fresh interpreter: under pytest the root logger has the
    # runner's handlers, which ``configure`` leaves alone.
    code = (
        "import logging\n"
        "from hotknob.daemon import logs\n"
        "logs.configure(json=True, level='error')\n"
        "logging.getLogger('watchdog.observers').warning('library warning')\n"
        "logs.get_logger().warning('own_warning')\n"
        "logging.getLogger('grpc').error('library error')\n"
        "logs.get_logger().error('own_error')\n"
        "logs.configure(json=True, level='debug')\n"  # below warning: warnings come again
        "logging.getLogger('grpc').info('library info')\n"
        "logging.getLogger('grpc').warning('library warning again')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    events = [json.loads(line)["event"] for line in done.stderr.splitlines()]
    assert events == ["library error", "own_error", "library warning again"]


class Weighted(BaseModel):
    """A schema with a mapping: ``--schema tests.test_review_logs:Weighted``."""

    lr: float = 0.1
    weights: dict[str, float] = Field(default_factory=dict)


def _wait_event(daemon: DaemonProcess, name: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = daemon.events(name)
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no {name} within {timeout} s:\n{daemon.log()[-2000:]}")


def test_an_accepted_change_of_a_big_mapping_is_one_short_log_line(tmp_path: Path) -> None:
    # A file's mapping of 3000 weights, all edited: the change_accepted line carried every
    # old and new weight (80 kB), where a rejection's line cuts each value at 200 chars.
    config = tmp_path / "weights.json"
    config.write_text(json.dumps({"weights": {f"w{i}": 1.0 for i in range(3000)}}))
    daemon = DaemonProcess(
        tmp_path,
        configs=[config],
        extra=["--schema", "tests.test_review_logs:Weighted"],
        env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    with daemon, RawClient(daemon.socket_path, name="trainer") as client:
        config.write_text(json.dumps({"lr": 0.2, "weights": {f"w{i}": 2.0 for i in range(3000)}}))
        line = _wait_event(daemon, "change_accepted")
        update = client.next_update()
    longest = max(len(text) for text in daemon.log().splitlines())
    assert longest < 2000, longest
    assert line["key"] == "lr,weights" and line["layer"] == "files"
    assert line["old"]["lr"] == 0.1 and line["new"]["lr"] == 0.2
    assert str(line["new"]["weights"]).endswith("...")
    assert "unlisted" not in line
    assert update["values"]["weights"]["w2999"] == 2.0  # the process gets them all


def test_a_live_config_masks_a_secret_its_callback_quotes_from_a_real_daemon(
    tmp_path: Path, runtime_log: _Lines
) -> None:
    """End to end: the daemon names every secret key in its snapshot (``secret``), not only
    the restart-only ones, and the process masks their values in what a failed callback
    logs. Before, ``service.api_key`` was named by no snapshot, so the runtime's masking
    had nothing to mask."""
    from hotknob.model_runtime import LiveConfig

    config = tmp_path / "config.yaml"
    config.write_text(f"service:\n  api_key: {OLD_SECRET}\n")
    extra = ["--schema", "tests.secret_schema:Params"]
    with DaemonProcess(tmp_path, configs=[config], extra=extra) as daemon:
        with RawClient(daemon.socket_path, name="raw") as raw:
            assert "service.api_key" in raw.snapshot.get("secret", [])
        live = LiveConfig.connect(str(daemon.socket_path), timeout=10, client="cb")
        try:

            def refuse(service: Mapping[str, Any]) -> None:
                raise RuntimeError(f"token {service['api_key']} refused")

            live.on_change("service", refuse)
            config.write_text(f"service:\n  api_key: {NEW_SECRET}\n")
            deadline = time.monotonic() + 20
            step = 0
            while not any("live_callback_failed" in t for t in runtime_log.text):
                assert time.monotonic() < deadline, "the change never reached the process"
                step += 1
                live.apply(step)
                time.sleep(0.01)
        finally:
            live.close()
    said = "\n".join(runtime_log.text)
    _assert_hidden(said)
    assert f"token {SECRET_SHOWN} refused" in said


def test_a_process_s_failed_apply_is_in_the_daemon_s_log(tmp_path: Path) -> None:
    """An ack that carries errors (a callback that raised) was kept in the process's status
    entry only: the daemon's log, read in an incident, did not say which process could not
    take which version. It says so now, a secret key's message withheld as in the entry."""
    extra = ["--schema", "tests.secret_schema:Params"]
    with DaemonProcess(tmp_path, extra=extra) as daemon:
        with RawClient(daemon.socket_path, name="cb") as client:
            version = client.snapshot["version"]
            errors = [
                {"key": "train.lr", "error": "ValueError: lr too high for warmup"},
                {"key": "service.api_key", "error": f"RuntimeError: token {NEW_SECRET} refused"},
            ]
            client.send(protocol.applied(version, 7, errors=errors))
            deadline = time.monotonic() + 10
            while not daemon.events("change_applied_with_errors"):
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.02)
        [event] = daemon.events("change_applied_with_errors")
    assert (event["client"], event["version"], event["step"]) == ("cb", version, 7)
    assert event["level"] == "warning"
    assert event["errors"][0] == errors[0]
    assert event["errors"][1]["key"] == "service.api_key"
    assert "withheld" in event["errors"][1]["error"]
    _assert_hidden(daemon.log())


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("no_color", "colored"), [(None, True), ("1", False)])
def test_no_color_turns_the_console_log_s_colours_off_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, no_color: str | None, colored: bool
) -> None:
    """``NO_COLOR`` set: the console log on a terminal has no escape sequence."""
    import structlog

    from hotknob.daemon import logs

    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    out = _Terminal()
    logs.configure(json=False, file=out)
    try:
        logs.get_logger("hotknob.test").warning("change_rejected", key="train.lr")
    finally:
        structlog.reset_defaults()
    assert "change_rejected" in out.getvalue()
    assert ("\x1b[" in out.getvalue()) is colored, repr(out.getvalue())
