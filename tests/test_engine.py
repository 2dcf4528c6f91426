"""The engine on its own: whole-candidate validation, versions, last-known-good, shadowing.

The engine does no I/O besides its state file, so these tests feed it etcd
events and file contents directly; the daemon tests drive it through real
etcd, files and sockets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from hotknob.config import InvalidChange, MLParams, cli_layer, defaults_layer, env_layer
from hotknob.config.merge import DEFAULT_PRECEDENCE
from hotknob.daemon.engine import Engine
from hotknob.daemon.socket_server import Published
from hotknob.daemon.state import StateStore

APP = "eng"
P = f"/hotknob/{APP}/config/"


def make_engine(tmp_path: Path, *extra: Any, published: list[Published] | None = None) -> Engine:
    sink = published if published is not None else []
    return Engine(
        schema=MLParams,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[defaults_layer(MLParams), env_layer(MLParams, environ={}), cli_layer([]), *extra],
        store=StateStore(tmp_path, APP),
        publish=sink.append,
    )


def files_start(engine: Engine) -> None:
    from hotknob.config import files_layer

    engine.layers["files"] = files_layer(MLParams, [])


def test_accepts_one_revision_as_one_version(tmp_path: Path) -> None:
    published: list[Published] = []
    engine = make_engine(tmp_path, published=published)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01"}, 5)
    assert engine.version == 1
    engine.on_etcd_change(6, {P + "train/lr": b"0.02", P + "train/momentum": b"0.5"}, [])
    assert engine.version == 2
    assert published[-1].flat["train.lr"] == 0.02
    assert published[-1].flat["train.momentum"] == 0.5
    assert published[-1].revision == 6
    assert len(published) == 2


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("train/lr", b"-1"),
        ("train/lr", b'"banana"'),
        ("sampling/top_p", b"2.0"),
        ("train/not_a_field", b"1"),
        ("train/lr", b"NaN"),
        ("train/lr", b"\xff"),
    ],
)
def test_invalid_change_is_rejected_and_last_good_stays(
    tmp_path: Path, path: str, raw: bytes
) -> None:
    published: list[Published] = []
    engine = make_engine(tmp_path, published=published)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01"}, 5)
    with capture_logs() as logs:
        engine.on_etcd_change(6, {P + path: raw}, [])
    assert engine.version == 1
    assert len(published) == 1
    assert engine.current is not None and engine.current.flat["train.lr"] == 0.01
    rejected = [e for e in logs if e["event"] == "change_rejected"]
    assert len(rejected) == 1
    assert rejected[0]["layer"] == "etcd"
    assert path.replace("/", ".") in rejected[0]["key"]
    # A later good change still goes through: the bad key is not kept in the layer.
    engine.on_etcd_change(7, {P + "train/lr": b"0.03"}, [])
    assert engine.version == 2 and engine.current.flat["train.lr"] == 0.03


def test_version_increases_across_restarts_and_identical_start_keeps_it(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01"}, 5)
    engine.on_etcd_change(6, {P + "train/lr": b"0.02"}, [])
    assert engine.version == 2
    again = make_engine(tmp_path)
    files_start(again)
    again.start({P + "train/lr": b"0.02"}, 6)
    assert again.version == 2  # same values: same version, clients apply nothing
    third = make_engine(tmp_path)
    files_start(third)
    third.start({P + "train/lr": b"0.05"}, 9)
    assert third.version == 3


def test_start_without_etcd_serves_last_known_good(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr": b"0.07"}, 5)
    later = make_engine(tmp_path)
    files_start(later)
    with capture_logs() as logs:
        later.start(None, 0)
    assert later.current is not None and later.current.flat["train.lr"] == 0.07
    assert later.current.revision == 5
    assert any(e["event"] == "serving_last_known_good" for e in logs)
    # etcd comes back with a newer value: a resync diff makes it one change.
    later.on_etcd_snapshot({P + "train/lr": b"0.08"}, 12)
    assert later.current.flat["train.lr"] == 0.08 and later.version == 2


def test_shadowed_live_edit_is_logged_not_published(tmp_path: Path) -> None:
    published: list[Published] = []
    env = env_layer(MLParams, environ={"HOTKNOB_PARAM_TRAIN__LR": "0.5"})
    engine = Engine(
        schema=MLParams,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[defaults_layer(MLParams), env, cli_layer([])],
        store=None,
        publish=published.append,
    )
    files_start(engine)
    engine.start({}, 1)
    with capture_logs() as logs:
        engine.on_etcd_change(2, {P + "train/lr": b"0.01"}, [])
    shadowed = [e for e in logs if e["event"] == "update_shadowed"]
    assert shadowed and shadowed[0]["key"] == "train.lr" and shadowed[0]["winner"] == "env"
    assert len(published) == 1 and engine.current is not None
    assert engine.current.flat["train.lr"] == 0.5


def test_restart_only_change_is_pending_not_pushed(tmp_path: Path) -> None:
    published: list[Published] = []
    engine = make_engine(tmp_path, published=published)
    files_start(engine)
    engine.start({}, 1)
    with capture_logs() as logs:
        engine.on_etcd_change(2, {P + "train/batch_size": b"64"}, [])
    assert engine.pending_restart == {"train.batch_size": 64}
    assert len(published) == 1
    assert any(e["event"] == "restart_pending" for e in logs)
    engine.on_etcd_change(3, {P + "train/lr": b"0.2"}, [])
    assert published[-1].flat["train.batch_size"] == 32
    assert published[-1].values["train"]["batch_size"] == 32


def test_delete_falls_back_to_lower_layer(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01"}, 1)
    engine.on_etcd_change(2, {}, [P + "train/lr"])
    assert engine.current is not None and engine.current.flat["train.lr"] == 1e-3
    assert engine.current.sources["train.lr"] == "defaults"


def test_invalid_keys_in_start_snapshot_are_dropped(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    with capture_logs() as logs:
        engine.start({P + "train/lr": b"-3", P + "train/momentum": b"0.4"}, 3)
    assert engine.current is not None
    assert engine.current.flat["train.lr"] == 1e-3
    assert engine.current.flat["train.momentum"] == 0.4
    assert any(e["event"] == "change_rejected" for e in logs)


def test_invalid_static_layer_refuses_to_start(tmp_path: Path) -> None:
    engine = Engine(
        schema=MLParams,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[defaults_layer(MLParams), cli_layer(["train.lr=-1"])],
        store=None,
    )
    files_start(engine)
    with pytest.raises(InvalidChange, match=r"train.lr \(from cli\)"):
        engine.start({}, 1)


def test_state_dir_that_is_a_file_is_reported_not_fatal(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    engine = make_engine(blocker / "state")
    files_start(engine)
    with capture_logs() as logs:
        engine.start({P + "train/lr": b"0.01"}, 1)
    engine.on_etcd_change(2, {P + "train/lr": b"0.02"}, [])
    assert engine.version == 2
    assert any(e["event"] == "state_write_failed" for e in logs)
