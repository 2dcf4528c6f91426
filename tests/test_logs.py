"""The daemon's log lines: JSON when not a terminal, credentials masked by field name."""

from __future__ import annotations

import datetime
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from hotknob.daemon import logs


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure(json=True)
    try:
        yield out
    finally:
        structlog.reset_defaults()


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_json_line_per_event_with_level_and_time(captured: io.StringIO) -> None:
    log = logs.get_logger("hotknob.test", app="job")
    log.info("change_accepted", key="train.lr", old={"train.lr": 0.1}, new={"train.lr": 0.2})
    log.warning("change_rejected", key="train.lr", reason="must be > 0")
    first, second = lines(captured)
    assert first["event"] == "change_accepted" and first["level"] == "info"
    assert first["app"] == "job" and first["new"] == {"train.lr": 0.2}
    assert str(first["timestamp"]).endswith("Z")
    assert second["event"] == "change_rejected" and second["level"] == "warning"


def test_fields_named_like_credentials_are_masked(captured: io.StringIO) -> None:
    log = logs.get_logger("hotknob.test")
    log.info("connecting", password="hunter2", api_Token="t0k", client_secret="s", user="root")
    log.info("connecting", password="again")  # the cached check gives the same answer
    first, second = lines(captured)
    assert first["password"] == first["api_Token"] == first["client_secret"] == logs.MASK
    assert first["user"] == "root"
    assert second["password"] == logs.MASK
    assert "hunter2" not in captured.getvalue() and "t0k" not in captured.getvalue()


def test_a_value_json_cannot_carry_is_logged_as_its_repr(captured: io.StringIO) -> None:
    log = logs.get_logger("hotknob.test")
    log.info("odd", value={1, 2}, path=b"\x00")
    (line,) = lines(captured)
    assert line["value"] == repr({1, 2})
    assert line["path"] == repr(b"\x00")


def test_debug_is_filtered_at_the_default_level(captured: io.StringIO) -> None:
    log = logs.get_logger("hotknob.test")
    log.debug("change_applied", version=3)
    log.info("kept")
    assert [line["event"] for line in lines(captured)] == ["kept"]


def test_the_time_stamp_is_structlogs_iso_utc_form(captured: io.StringIO) -> None:
    before = datetime.datetime.now(datetime.UTC)
    logs.get_logger("hotknob.test").info("one")
    after = datetime.datetime.now(datetime.UTC)
    (line,) = lines(captured)
    stamp = str(line["timestamp"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - datetime.timedelta(milliseconds=1) <= when <= after


def test_a_library_s_warning_is_a_json_line_too() -> None:
    # Seen at a daemon's stop: watchdog's "InotifyEmitter.queue_events() called when the
    # thread is inactive" came as "name: message" among the JSON lines. Run in a fresh
    # interpreter: under pytest the root logger has the runner's handlers, left alone.
    code = (
        "import logging\n"
        "from hotknob.daemon import logs\n"
        "logs.configure(json=True)\n"
        "logs.configure(json=True)\n"  # a second call replaces its handler, adds none
        "logging.getLogger('watchdog.observers.inotify').warning('emitter %s', 'inactive')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    logging.getLogger('asyncio').exception('callback failed')\n"
        "logging.getLogger('grpc').info('below warning: not shown')\n"
        "logs.get_logger().info('own_event', a=1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["event"], e.get("logger"), e["level"]) for e in lines] == [
        ("emitter inactive", "watchdog.observers.inotify", "warning"),
        ("callback failed", "asyncio", "error"),
        ("own_event", None, "info"),
    ]
    assert "ZeroDivisionError" in lines[1]["exception"]
    assert all("timestamp" in e for e in lines)
