"""A rejection with thousands of problems (a file of ten thousand unknown keys) still
reaches ``watch`` clients: its event names the first ``MAX_LISTED`` and counts the rest,
where one event naming them all went over the socket's line limit and was dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hotknob.config import InvalidChange
from hotknob.config.errors import Problem
from hotknob.daemon.announce import MAX_LISTED, Announcer
from hotknob.daemon.cmd_live import _describe
from hotknob.model_runtime import protocol
from tests.daemon_proc import DaemonProcess, RawClient
from tests.test_file_watcher import lr_yaml

pytestmark = pytest.mark.timeout(60)

UNKNOWN = 10_000


def announcer(events: list[dict[str, Any]], logged: list[dict[str, Any]]) -> Announcer:
    class Log:
        def warning(self, event: str, **fields: Any) -> None:
            logged.append({"event": event, **fields})

    return Announcer(
        Log(),
        secrets=frozenset(),
        broadcast=events.append,
        on_accepted=lambda layer, version: None,
        on_rejected=lambda layer, revision, reason, keys: None,
    )


def test_a_rejection_names_the_first_problems_and_counts_the_rest() -> None:
    events: list[dict[str, Any]] = []
    logged: list[dict[str, Any]] = []
    edited = {f"section_{i:05d}.knob": "x" * 150 for i in range(UNKNOWN)}
    problems = [Problem(key, "files", "not a key of the schema", v) for key, v in edited.items()]
    announcer(events, logged).rejected("files", 0, 4, InvalidChange(problems), edited, {})

    [event] = events
    assert len(protocol.encode(event)) < protocol.MAX_LINE_BYTES
    assert [p["key"] for p in event["problems"]] == list(edited)[:MAX_LISTED]
    assert list(event["new"]) == list(edited)[:MAX_LISTED]
    assert event["unlisted"] == {"problems": UNKNOWN - MAX_LISTED, "keys": UNKNOWN - MAX_LISTED}
    assert _describe(event).endswith(f"; and {UNKNOWN - MAX_LISTED} more")
    [line] = logged
    assert line["reason"].endswith(f"; and {UNKNOWN - MAX_LISTED} more")
    assert line["reason"].count("not a key of the schema") == MAX_LISTED
    assert line["unlisted"] == event["unlisted"]


def test_a_short_rejection_is_listed_whole() -> None:
    events: list[dict[str, Any]] = []
    logged: list[dict[str, Any]] = []
    edited = {"train.lr": -1.0, "train.momentum": 7.0}
    problems = [Problem(k, "etcd", "out of range", v) for k, v in edited.items()]
    exc = InvalidChange(problems)
    announcer(events, logged).rejected("etcd", 9, 4, exc, edited, {"train.lr": 0.1})

    [event] = events
    assert "unlisted" not in event and "unlisted" not in logged[0]
    assert [p["key"] for p in event["problems"]] == list(edited)
    assert event["old"] == {"train.lr": 0.1, "train.momentum": None}
    assert logged[0]["reason"] == str(exc)
    assert "more" not in _describe(event)


def test_a_watch_client_hears_of_a_file_with_ten_thousand_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(lr_yaml(0.01))
    with (
        DaemonProcess(tmp_path, configs=[path]) as daemon,
        RawClient(daemon.socket_path, watch=True) as client,
    ):
        unknown = "".join(f"knob_{i:05d}: {i}\n" for i in range(UNKNOWN))
        path.write_text(lr_yaml(0.02) + unknown)
        event = client.next()
        assert event["event"] == "change_rejected", event
        assert len(event["problems"]) == MAX_LISTED
        assert event["unlisted"]["problems"] == UNKNOWN - MAX_LISTED
        assert "event_dropped" not in daemon.log(since_start=True)
