"""Restart-only keys: what clients keep, what is pending, and when it is said."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from structlog.testing import capture_logs

from hotknob.config import Snapshot
from hotknob.daemon.logs import get_logger
from hotknob.daemon.restart_only import RestartOnly


def snapshot(values: dict[str, Any], flat: dict[str, Any]) -> Snapshot:
    return Snapshot(
        model=None,  # type: ignore[arg-type]  # not read here
        values=MappingProxyType(values),
        flat=MappingProxyType(flat),
        sources=MappingProxyType(dict.fromkeys(flat, "etcd")),
        layers=MappingProxyType({}),
        precedence=("defaults", "etcd"),
    )


def started() -> RestartOnly:
    keys = RestartOnly(frozenset({"train.batch_size", "gone"}), get_logger("hotknob.test"))
    keys.start({"train.batch_size": 32, "train.lr": 0.1})
    return keys


def test_the_running_values_are_those_at_start() -> None:
    keys = started()
    assert keys.running == {"train.batch_size": 32}  # "gone" had no value
    assert keys.held_back({"train.batch_size": 32, "train.lr": 0.5}) == {}
    assert keys.held_back({"train.batch_size": 64}) == {"train.batch_size": 32}
    assert keys.held_back({"train.batch_size": 32.0}) == {"train.batch_size": 32}  # type counts
    assert keys.held_back({}) == {"train.batch_size": 32}


def test_clients_get_the_running_value_and_the_snapshot_is_not_edited() -> None:
    keys = started()
    train = {"batch_size": 32, "lr": 0.2}
    same = keys.in_force({"train": train}, {"train.batch_size": 32, "train.lr": 0.2})
    assert same == {"train": train} and same["train"] is train  # nothing held: shared

    wanted = {"batch_size": 64, "lr": 0.2}
    values = {"train": wanted}
    got = keys.in_force(values, {"train.batch_size": 64, "train.lr": 0.2})
    assert got == {"train": {"batch_size": 32, "lr": 0.2}}
    assert values == {"train": {"batch_size": 64, "lr": 0.2}} and got["train"] is not wanted


def test_a_new_wanted_value_is_said_once_and_forgotten_when_undone() -> None:
    keys = started()
    with capture_logs() as said:
        keys.track(snapshot({}, {"train.batch_size": 64}), "etcd")
        keys.track(snapshot({}, {"train.batch_size": 64}), "files")  # the same wanted value
        keys.track(snapshot({}, {"train.batch_size": 128}), "etcd")
    assert [(e["event"], e["wanted"], e["layer"]) for e in said] == [
        ("restart_pending", 64, "etcd"),
        ("restart_pending", 128, "etcd"),
    ]
    assert keys.pending == {"train.batch_size": 128}
    keys.track(snapshot({}, {"train.batch_size": 32}), "etcd")
    assert keys.pending == {}


def test_a_change_of_the_keys_pending_is_told() -> None:
    told: list[dict[str, Any]] = []
    keys = RestartOnly(frozenset({"train.batch_size"}), get_logger("hotknob.test"))
    keys._on_pending = lambda: told.append(dict(keys.pending))
    keys.start({"train.batch_size": 32})
    keys.track(snapshot({}, {"train.batch_size": 64}), "etcd")
    keys.track(snapshot({}, {"train.batch_size": 128}), "etcd")  # another wanted value
    keys.track(snapshot({}, {"train.batch_size": 128}), "files")  # the same: not told
    keys.track(snapshot({}, {"train.batch_size": 32}), "etcd")
    # A new wanted value of a key pending is told too: which processes run it changes.
    assert told == [{"train.batch_size": 64}, {"train.batch_size": 128}, {}]


def test_a_process_holds_restart_only_keys_at_the_values_it_runs() -> None:
    from hotknob.model_runtime.received import State, with_held

    sent = State.build(9, 90, {"train": {"batch_size": 64, "lr": 0.2}, "opts": {"a": 1}})
    same = with_held(sent, {"train.lr": 0.2, "gone.key": 1})
    assert same is sent and same.held == ()
    held = with_held(sent, {"train.batch_size": 32, "opts": {"a": 2}})
    assert held.held == ("opts", "train.batch_size")
    assert held.flat == {"train.batch_size": 32, "train.lr": 0.2, "opts.a": 2}
    assert (held.version, held.revision) == (9, 90)
    assert sent.flat["train.batch_size"] == 64  # the state as sent is not edited
    assert with_held(sent, {"train.batch_size": 64.0}).flat["train.batch_size"] == 64.0
