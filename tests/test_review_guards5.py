"""Guarded changes written again by other operators while several daemons of one app
watch them: the guard stands down once, as ``superseded``, and nothing reverts the later
write. Real etcd, real daemons, raw clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import (
    APP,
    P,
    guard_records,
    guarded_set,
    kv,
    metrics,
    report_until_published,
    wait_for,
)
from tests.test_guards_judging import ack

pytestmark = pytest.mark.timeout(60)


def _errors(daemon: DaemonProcess) -> list[str]:
    return [line for line in daemon.log().splitlines() if '"level": "error"' in line]


def two_daemons(tmp_path: Path, etcd: EtcdServer) -> list[DaemonProcess]:
    """Daemons of one app on nodes n1 and n2, not started."""
    daemons = []
    for node in ("n1", "n2"):
        (tmp_path / node).mkdir()
        extra = ["--node", node, "--status-every", "0.5"]
        daemons.append(DaemonProcess(tmp_path / node, endpoints=etcd.endpoint, extra=extra))
    return daemons


def test_a_guard_whose_key_was_written_while_its_daemons_were_down_stands_down_at_their_start(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Both daemons of the app are killed inside the window, and another operator unsets
    one of the two guarded keys meanwhile. Started again, they read the armed record back:
    it stood armed, judging a change that no longer runs, until its verdict (a whole window
    of reports), where a write they see while it is armed ends it at once."""
    daemons = two_daemons(tmp_path, etcd)
    try:
        for daemon in daemons:
            daemon.start()
        clients = [RawClient(d.socket_path, f"c{i}") for i, d in enumerate(daemons, 1)]
        for i, client in enumerate(clients, 1):
            ack(client, client.snapshot["version"], 0)
            report_until_published(client, etcd, f"c{i}", range(1, 4))
        out = guarded_set(
            etcd, "train.lr=0.5", "train.momentum=0.8", "--guard", "loss < 3", "--window", "1000"
        )
        for client in clients:
            ack(client, client.next_update()["version"], 10)
        wait_for("armed on both", lambda: all(d.events("guard_armed") for d in daemons))
        for daemon, client in zip(daemons, clients, strict=True):
            daemon.kill()
            client.close()
        done = run_cli("unset", "--app", APP, "--etcd-endpoints", etcd.endpoint, "train.momentum")
        assert done.returncode == 0, done.stderr
        for daemon in daemons:
            daemon.start()

        def ended() -> list[dict[str, object]]:
            return [r for r in guard_records(etcd) if r["state"] != "armed"]

        (record,) = wait_for("the guard to stand down", ended, timeout=10)
        assert record["id"] == out["guard"] and record["state"] == "superseded", record
        outcome = record["outcome"]
        assert isinstance(outcome, dict)
        assert "(train.momentum deleted)" in outcome["reason"], outcome
        assert outcome["changed"] == {P + "train/momentum": 0}, outcome
        ending = wait_for(
            "the ending logged once",
            lambda: [e for d in daemons for e in d.events("guard_superseded")],
        )
        assert len(ending) == 1 and ending[0]["guard"] == out["guard"], ending
        # Nothing reverted: the other key keeps the guarded value, the unset stays.
        assert kv(etcd, P + "train/lr") == ("0.5", out["revision"])
        assert kv(etcd, P + "train/momentum") == (None, 0)
        assert not [e for d in daemons for e in d.events("change_reverted")]
        shown = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint, "--json")
        assert shown.returncode == 0, shown.stderr
        (guard,) = json.loads(shown.stdout)["guards"]
        assert guard["state"] == "superseded", guard
        for daemon in daemons:
            assert daemon.proc is not None and daemon.proc.poll() is None
            assert _errors(daemon) == []
    finally:
        for daemon in daemons:
            daemon.stop()


def _events_until(watcher: RawClient, name: str, guard: str, seen: list[str]) -> dict[str, Any]:
    """The ``name`` event of ``guard`` that ``watcher`` gets; every guard event's name
    before it is added to ``seen``."""
    while True:
        message = watcher.next(timeout=10)
        if message.get("type") != "event" or "guard" not in message:
            continue
        seen.append(f"{message['event']} {message['guard']}")
        if message["event"] == name and message["guard"] == guard:
            return message


def test_every_daemon_s_watchers_hear_how_a_guard_ended_whichever_daemon_ended_it(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Two daemons of one app, a ``watch`` on each. Another operator's write of the
    guarded key ends the first guard ``superseded``; a NaN reported on n1 reverts the
    second. Only the daemon whose transaction wrote an ending sent it to its watchers:
    a ``watch`` on any other node never heard that the change it watched was reverted."""
    daemons = two_daemons(tmp_path, etcd)
    try:
        for daemon in daemons:
            daemon.start()
        watchers = [RawClient(d.socket_path, "w", watch=True) for d in daemons]
        clients = [RawClient(d.socket_path, f"c{i}") for i, d in enumerate(daemons, 1)]
        for i, client in enumerate(clients, 1):
            ack(client, client.snapshot["version"], 0)
            report_until_published(client, etcd, f"c{i}", range(1, 4))
        first = guarded_set(etcd, "train.lr=0.5", "--guard", "loss < 3", "--window", "1000")
        for client in clients:
            ack(client, client.next_update()["version"], 10)
        wait_for("armed on both", lambda: all(d.events("guard_armed") for d in daemons))
        done = run_cli("set", "--app", APP, "--etcd-endpoints", etcd.endpoint, "train.lr=0.25")
        assert done.returncode == 0, done.stderr
        seen: list[list[str]] = [[] for _ in watchers]
        for watcher, got in zip(watchers, seen, strict=True):
            event = _events_until(watcher, "guard_superseded", first["guard"], got)
            assert "(train.lr at revision" in event["reason"], event
            assert event["guarded_revision"] == first["revision"], event

        for client in clients:
            update = client.next_update()
            assert update["changed"] == {"train.lr": 0.25}, update
            ack(client, update["version"], 15)
        second = guarded_set(etcd, "train.lr=0.125", "--guard", "loss < 3", "--window", "1000")
        for client in clients:
            ack(client, client.next_update()["version"], 20)
        wait_for("armed again", lambda: all(len(d.events("guard_armed")) == 2 for d in daemons))
        clients[0].send(metrics(21, loss="nan"))
        for watcher, got in zip(watchers, seen, strict=True):
            event = _events_until(watcher, "change_reverted", second["guard"], got)
            assert event["restored"] == {"train.lr": 0.25}, event
            assert event["replaced"] == {"train.lr": 0.125}, event
            assert event["reason"] == "n1/c1 reported loss=nan at step 21", event
            assert event["revision"] > second["revision"], event
        # Once each, on every daemon; logged once, by the daemon that wrote it.
        expected = [
            f"guard_superseded {first['guard']}",
            f"change_reverted {second['guard']}",
        ]
        assert seen == [expected] * 2, seen
        assert kv(etcd, P + "train/lr")[0] == "0.25"
        assert len([e for d in daemons for e in d.events("change_reverted")]) == 1
        assert len([e for d in daemons for e in d.events("guard_superseded")]) == 1
        for daemon in daemons:
            assert _errors(daemon) == []
    finally:
        for daemon in daemons:
            daemon.stop()
