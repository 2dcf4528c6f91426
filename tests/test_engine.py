"""The engine on its own: whole-candidate validation, versions, last-known-good, shadowing.

The engine does no I/O besides its state file, so these tests feed it etcd
events and file contents directly; the daemon tests drive it through real
etcd, files and sockets.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field
from structlog.testing import capture_logs

from hotknob.config import InvalidChange, MLParams, cli_layer, defaults_layer, env_layer
from hotknob.config.merge import DEFAULT_PRECEDENCE
from hotknob.daemon.engine import Engine
from hotknob.daemon.logs import get_logger
from hotknob.daemon.socket_server import Published
from hotknob.daemon.state import StateStore
from tests.banded_schema import Banded

APP = "eng"
P = f"/hotknob/{APP}/config/"


def make_engine(
    tmp_path: Path,
    *extra: Any,
    published: list[Published] | None = None,
    schema: type[BaseModel] = MLParams,
    events: list[dict[str, Any]] | None = None,
) -> Engine:
    sink = published if published is not None else []
    return Engine(
        schema=schema,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[defaults_layer(schema), env_layer(schema, environ={}), cli_layer([]), *extra],
        store=StateStore(tmp_path, APP),
        publish=sink.append,
        broadcast=(events if events is not None else []).append,
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
        ("train/lr", b"true"),  # not 1.0
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
    key = path.replace("/", ".")
    assert key in rejected[0]["key"]
    # What it would have set, and what stays in force instead (DESIGN: key, old, new).
    assert list(rejected[0]["new"]) == [key]
    assert rejected[0]["old"] == {key: engine.current.flat.get(key)}
    # A later good change still goes through: the bad key is not kept in the layer.
    engine.on_etcd_change(7, {P + "train/lr": b"0.03"}, [])
    assert engine.version == 2 and engine.current.flat["train.lr"] == 0.03


def test_version_increases_across_restarts_and_identical_clean_start_keeps_it(
    tmp_path: Path,
) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01"}, 5)
    engine.on_etcd_change(6, {P + "train/lr": b"0.02"}, [])
    assert engine.version == 2
    engine.close()
    again = make_engine(tmp_path)
    files_start(again)
    again.start({P + "train/lr": b"0.02"}, 6)
    assert again.version == 2  # clean stop, same values: same version, clients apply nothing
    again.close()
    third = make_engine(tmp_path)
    files_start(third)
    third.start({P + "train/lr": b"0.05"}, 9)
    assert third.version == 3  # after a clean stop nothing above 2 was ever published
    third.close()


def test_restart_after_a_crash_starts_above_every_version_reserved(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01"}, 5)
    for revision in range(6, 9):
        engine.on_etcd_change(revision, {P + "train/lr": str(revision / 100).encode()}, [])
    assert engine.version == 4
    assert engine._keeper is not None
    engine._keeper.flush()  # the saved snapshot is the newest; still no clean stop
    again = make_engine(tmp_path)
    files_start(again)
    again.start({P + "train/lr": b"0.08"}, 8)  # the same values: still a new version
    assert again.version > 4
    again.close()


def test_kill_right_after_a_push_never_reissues_its_version(tmp_path: Path) -> None:
    """The disk as a SIGKILL would leave it: the push happened, its snapshot was never saved.

    The state file is copied as it was right before the push (only the synchronous
    start write had happened) and put back after it; a restart on other values must
    not publish the pushed version again.
    """
    published: list[Published] = []
    engine = make_engine(tmp_path, published=published)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01"}, 5)
    state_file = tmp_path / f"{APP}.state.json"
    before_push = state_file.read_bytes()
    engine.on_etcd_change(6, {P + "train/lr": b"0.02"}, [])
    pushed = published[-1]
    assert pushed.version == 2 and pushed.flat["train.lr"] == 0.02
    assert engine._keeper is not None
    engine._keeper.flush()  # joined here only so that nothing writes after the copy below
    state_file.write_bytes(before_push)
    for lr in (b"0.01", b"0.03"):
        restarted = make_engine(tmp_path)
        files_start(restarted)
        restarted.start({P + "train/lr": lr}, 7)
        assert restarted.version > pushed.version
        assert restarted._keeper is not None
        restarted._keeper.flush()
        state_file.write_bytes(before_push)


def test_versions_past_a_reserved_block_are_reserved_before_they_are_pushed(
    tmp_path: Path,
) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01"}, 5)
    first_ceiling = engine.store.ceiling if engine.store else 0
    assert first_ceiling >= engine.version
    engine.version = first_ceiling  # as if a block's worth of versions had been pushed
    engine.on_etcd_change(6, {P + "train/lr": b"0.02"}, [])
    assert engine.version == first_ceiling + 1
    assert engine.store is not None
    saved = engine.store.load()
    assert saved is not None and saved.version_ceiling > engine.version
    assert saved.version == engine.version  # written synchronously with the new ceiling
    engine.close()


def test_start_without_etcd_serves_last_known_good(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr": b"0.07"}, 5)
    engine.close()
    later = make_engine(tmp_path)
    files_start(later)
    with capture_logs() as logs:
        later.start(None, 0)
    assert later.current is not None and later.current.flat["train.lr"] == 0.07
    assert later.current.revision == 5
    assert later.version == 1  # clean stop, same values
    assert any(e["event"] == "serving_last_known_good" for e in logs)
    # etcd comes back with a newer value: a resync diff makes it one change.
    later.on_etcd_snapshot({P + "train/lr": b"0.08"}, 12)
    assert later.current.flat["train.lr"] == 0.08 and later.version == 2
    later.close()


def test_start_without_etcd_after_a_crash_serves_the_newest_saved_values(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr": b"0.07"}, 5)
    engine.on_etcd_change(6, {P + "train/lr": b"0.09"}, [])
    assert engine._keeper is not None
    engine._keeper.flush()
    later = make_engine(tmp_path)
    files_start(later)
    later.start(None, 0)
    assert later.current is not None and later.current.flat["train.lr"] == 0.09
    assert later.version > engine.version
    later.close()


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


def test_a_new_winning_layer_with_the_same_value_is_in_sources_but_not_pushed(
    tmp_path: Path,
) -> None:
    # etcd now sets each key to the value it had from defaults: no value changed, so no
    # version and no push, but a client that connects is told where each value comes from.
    published: list[Published] = []
    engine = make_engine(tmp_path, published=published)
    files_start(engine)
    engine.start({}, 1)
    assert engine.current is not None and engine.current.sources["train.momentum"] == "defaults"
    engine.on_etcd_change(2, {P + "train/momentum": b"0.9"}, [])  # a lone put
    engine.on_etcd_change(3, {P + "train/lr": b"0.001", P + "train/warmup_steps": b"0"}, [])
    engine.on_etcd_changes(  # a group
        [(4, {P + "train/weight_decay": b"0.0"}, frozenset()), (5, {P + "train/lr": b"1e-3"}, [])]
    )
    engine.finish()
    assert (engine.version, len(published)) == (1, 1)
    sources = engine.current.sources
    assert [sources[f"train.{k}"] for k in ("momentum", "lr", "warmup_steps", "weight_decay")] == [
        "etcd"
    ] * 4, sources


def test_invalid_keys_in_start_snapshot_are_dropped(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    with capture_logs() as logs:
        engine.start({P + "train/lr": b"-3", P + "train/momentum": b"0.4"}, 3)
    assert engine.current is not None
    assert engine.current.flat["train.lr"] == 1e-3
    assert engine.current.flat["train.momentum"] == 0.4
    assert any(e["event"] == "change_rejected" for e in logs)


def test_a_restart_on_a_value_it_refuses_keeps_the_value_it_ran(tmp_path: Path) -> None:
    """etcd now holds a value the daemon refused on the way (written with etcdctl): the
    running daemon kept 0.2; restarted, it must not trade 0.2 for the default 0.001."""
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr": b"0.2"}, 5)
    engine.on_etcd_change(6, {P + "train/lr": b"-1"}, [])  # refused: 0.2 stays
    assert engine.current is not None and engine.current.flat["train.lr"] == 0.2
    version = engine.version
    engine.close()

    later = make_engine(tmp_path)
    files_start(later)
    with capture_logs() as logs:
        later.start({P + "train/lr": b"-1", P + "train/momentum": b"0.5"}, 7)
    assert later.current is not None
    assert later.current.flat["train.lr"] == 0.2
    assert later.current.flat["train.momentum"] == 0.5  # the key beside it is taken
    assert later.current.sources["train.lr"] == "etcd"
    assert later.version == version + 1  # new values (momentum): a new version
    (rejected,) = [e for e in logs if e["event"] == "change_rejected"]
    assert rejected["key"] == "train.lr" and "greater than 0" in rejected["reason"]
    (kept,) = [e for e in logs if e["event"] == "etcd_value_kept"]
    assert kept["keys"] == ["train.lr"] and kept["revision"] == 7
    later.close()


def test_a_restart_with_nothing_else_changed_keeps_its_version(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr": b"0.2"}, 5)
    engine.on_etcd_change(6, {P + "train/lr": b"0"}, [])  # refused
    version = engine.version
    engine.close()
    later = make_engine(tmp_path)
    files_start(later)
    later.start({P + "train/lr": b"0"}, 6)
    assert later.current is not None and later.current.flat["train.lr"] == 0.2
    assert later.version == version  # a clean stop, the same values: the same version
    later.close()


def test_a_full_read_on_a_value_it_refuses_keeps_the_value_in_force(tmp_path: Path) -> None:
    published: list[Published] = []
    engine = make_engine(tmp_path, published=published)
    files_start(engine)
    engine.start({P + "train/lr": b"0.2", P + "sampling/top_p": b"0.9"}, 5)
    # After a compaction the watch reads etcd whole: lr is now refused, top_p gone.
    with capture_logs() as logs:
        engine.on_etcd_snapshot({P + "train/lr": b'"fast"'}, 30)
    assert engine.current is not None
    assert engine.current.flat["train.lr"] == 0.2
    assert engine.current.flat["sampling.top_p"] == 1.0  # deleted in etcd: the default
    assert engine.layers["etcd"].values == {"train.lr": 0.2}
    assert any(e["event"] == "etcd_value_kept" for e in logs)
    assert any(e["event"] == "change_rejected" and e["key"] == "train.lr" for e in logs)
    # A valid value at the next change is taken as any other.
    engine.on_etcd_change(31, {P + "train/lr": b"0.05"}, [])
    assert engine.current.flat["train.lr"] == 0.05
    engine.close()


def test_a_kept_value_the_schema_no_longer_takes_is_dropped_too(tmp_path: Path) -> None:
    class Older(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lr: float = Field(0.1, gt=0)

    class Newer(BaseModel):  # the next release bounds lr above
        model_config = ConfigDict(extra="forbid")
        lr: float = Field(0.1, gt=0, le=1)

    old = make_engine(tmp_path, schema=Older)
    old.start({P + "lr": b"5"}, 3)
    old.close()
    new = make_engine(tmp_path, schema=Newer)
    with capture_logs() as logs:
        new.start({P + "lr": b"-1"}, 4)  # refused; and the 5 it ran no longer fits
    assert new.current is not None and new.current.flat == {"lr": 0.1}
    assert new.layers["etcd"].values == {}
    (unfit,) = [e for e in logs if e["event"] == "etcd_value_not_kept"]
    assert unfit["keys"] == ["lr"]
    assert not any(e["event"] == "etcd_value_kept" for e in logs)
    new.close()


def test_a_restart_on_config_files_it_refuses_starts_on_their_saved_contents(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    engine = make_engine(tmp_path)
    engine.start({}, 1, files=[(config, {"train": {"lr": 0.05}})])
    assert engine.files_refused is None
    engine.on_files([(config, {"train": {"lr": 0.07}})])  # taken: what the state file saves
    engine.on_files([(config, {"train": {"lr": -7}})])  # refused: 0.07 stays in force
    engine.close()

    later = make_engine(tmp_path)
    assert later.saved_files([config]) == {config: {"train": {"lr": 0.07}}}
    assert later.saved_files([tmp_path / "other.yaml"]) == {}  # not the files it ran
    with capture_logs() as logs:
        later.start({}, 1, files=[(config, {"train": {"lr": -7}})])
    assert later.current is not None and later.current.flat["train.lr"] == 0.07
    assert later.files_refused is not None
    assert f"train.lr (from files: {config})" in later.files_refused
    assert any(e["event"] == "config_files_refused_at_start" for e in logs)
    # The next valid contents are taken as any edit.
    assert later.on_files([(config, {"train": {"lr": 0.09}})])
    assert later.current.flat["train.lr"] == 0.09
    later.close()


def test_file_contents_are_saved_as_json_holds_them(tmp_path: Path) -> None:
    import datetime
    import math

    from hotknob.daemon.state_keeper import StateKeeper

    keeper = StateKeeper(StateStore(tmp_path, APP), get_logger("hotknob.test"))
    config = tmp_path / "c.yaml"
    keeper.files_in_force([(config, {"run": {"since": datetime.date(2026, 11, 30)}})])
    assert keeper.files == ((str(config), {"run": {"since": "2026-11-30"}}),)
    keeper.files_in_force([(config, {"x": math.nan})])  # nothing a state file can hold
    assert keeper.files == ()


def test_files_it_never_ran_or_a_static_layer_at_fault_still_refuse_to_start(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    first = make_engine(tmp_path)
    with pytest.raises(InvalidChange, match=r"train\.lr"):  # no state file: nothing ran
        first.start({}, 1, files=[(config, {"train": {"lr": -1}})])
    ran = make_engine(tmp_path)
    ran.start({}, 1, files=[(config, {"train": {"lr": 0.05}})])
    ran.close()
    other = tmp_path / "other.yaml"
    with pytest.raises(InvalidChange, match=r"train\.lr"):  # ran other files
        make_engine(tmp_path).start({}, 1, files=[(other, {"train": {"lr": -1}})])
    pinned = make_engine(tmp_path, cli_layer(["train.momentum=7"]))
    with pytest.raises(InvalidChange, match=r"train\.momentum"):  # --set at fault
        pinned.start({}, 1, files=[(config, {"train": {"lr": 0.06}})])


def test_a_file_value_a_higher_layer_shadows_is_checked_all_the_same(tmp_path: Path) -> None:
    """The files must be valid over the defaults alone, as ``hotknob validate`` checks them:
    a value etcd shadows takes effect once the key leaves etcd, and that delete must not
    be refused for it."""
    config = tmp_path / "config.yaml"
    events: list[dict[str, Any]] = []
    engine = make_engine(tmp_path, events=events)
    engine.start({P + "train/lr": b"0.1"}, 5, files=[(config, {"train": {"lr": 0.05}})])
    assert not engine.on_files([(config, {"train": {"lr": -1.0, "momentum": 0.5}})])
    (rejected,) = [e for e in events if e.get("event") == "change_rejected"]
    assert rejected["layer"] == "files"
    assert [p["key"] for p in rejected["problems"]] == ["train.lr"]
    assert "without the layers above the files" in rejected["problems"][0]["reason"]
    assert rejected["problems"][0]["path"] == str(config)  # which --config to fix
    assert engine.layers["files"].values == {"train.lr": 0.05}  # the last good contents
    assert engine.current is not None and engine.current.flat["train.momentum"] == 0.9

    engine.on_etcd_change(6, {}, [P + "train/lr"])  # the key leaves etcd: taken
    assert engine.current.flat["train.lr"] == 0.05
    assert engine.current.sources["train.lr"] == "files"
    engine.close()


def test_a_start_on_files_invalid_under_a_pinned_key_is_refused(tmp_path: Path) -> None:
    """``--set`` (or env) pinning the key does not make an invalid file value acceptable at a
    start either; a restart on such an edit starts on the files' saved contents."""
    config = tmp_path / "config.yaml"
    pinned = make_engine(tmp_path, cli_layer(["train.lr=0.1"]))
    with pytest.raises(InvalidChange, match=re.escape(f"train.lr (from files: {config})")):
        pinned.start({}, 1, files=[(config, {"train": {"lr": -1}})])

    ran = make_engine(tmp_path, cli_layer(["train.lr=0.1"]))
    ran.start({}, 1, files=[(config, {"train": {"lr": 0.05}})])
    ran.close()
    later = make_engine(tmp_path, cli_layer(["train.lr=0.1"]))
    later.start({}, 1, files=[(config, {"train": {"lr": -1}})])
    assert later.files_refused is not None
    assert f"train.lr (from files: {config})" in later.files_refused
    assert later.layers["files"].values == {"train.lr": 0.05}
    assert later.current is not None and later.current.flat["train.lr"] == 0.1
    later.close()


def test_a_full_read_that_breaks_a_rule_across_fields_drops_only_the_keys_behind_it(
    tmp_path: Path,
) -> None:
    engine = make_engine(tmp_path, schema=Banded)
    with capture_logs() as logs:
        engine.start({P + "steps": b"3", P + "band/lo": b"5"}, 10)  # lo > hi
    assert engine.current is not None
    assert engine.current.flat == {"band.lo": 0.0, "band.hi": 1.0, "steps": 3}
    (rejected,) = [e for e in logs if e["event"] == "change_rejected"]
    assert "band.lo" in str(rejected) and "lo must not exceed hi" in str(rejected)

    # The same after a compaction (a resync): the valid key is taken, the other dropped.
    engine.on_etcd_snapshot({P + "steps": b"4", P + "band/lo": b"7"}, 20)
    assert engine.current.flat == {"band.lo": 0.0, "band.hi": 1.0, "steps": 4}
    assert engine.layers["etcd"].values == {"steps": 4}
    engine.close()


def test_a_rule_broken_without_etcd_still_refuses_to_start(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, cli_layer(["band.lo=5"]), schema=Banded)
    with pytest.raises(InvalidChange, match="lo must not exceed hi"):
        engine.start({P + "steps": b"3"}, 10)


def test_a_key_below_a_leaf_in_etcd_is_dropped_at_start_and_resync(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    files_start(engine)
    engine.start({P + "train/lr/x": b"1", P + "train/momentum": b"0.4"}, 3)
    assert engine.current is not None and engine.current.flat["train.momentum"] == 0.4
    engine.on_etcd_snapshot({P + "train/lr/x": b"1", P + "train/momentum": b"0.5"}, 9)
    assert engine.current.flat["train.momentum"] == 0.5
    engine.close()


def test_saved_etcd_values_the_schema_no_longer_has_are_dropped_without_etcd(
    tmp_path: Path,
) -> None:
    class Older(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lr: float = Field(0.1, gt=0)
        note: str = ""

    class Newer(BaseModel):  # the next release of the user's schema has no ``note``
        model_config = ConfigDict(extra="forbid")
        lr: float = Field(0.1, gt=0)

    old = make_engine(tmp_path, schema=Older)
    old.start({P + "lr": b"0.5", P + "note": b'"hi"'}, 3)
    old.close()
    new = make_engine(tmp_path, schema=Newer)
    with capture_logs() as logs:
        new.start(None, 0)  # etcd unreachable: the last-known-good values
    assert new.current is not None and new.current.flat == {"lr": 0.5}
    assert any(e["event"] == "change_rejected" for e in logs)
    assert not any(e["event"].startswith("etcd_value_") for e in logs)  # nothing to keep
    new.close()


def test_a_state_too_large_for_the_socket_protocol_is_rejected(tmp_path: Path) -> None:
    from hotknob.config.sendable import MAX_STATE_BYTES

    class Noted(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lr: float = Field(0.1, gt=0)
        note: str = ""
        other: str = ""

    published: list[Published] = []
    engine = make_engine(tmp_path, published=published, schema=Noted)
    half = b'"' + b"x" * (MAX_STATE_BYTES // 2) + b'"'
    engine.start({P + "note": half}, 1)  # half the limit: it fits
    with capture_logs() as logs:
        engine.on_etcd_change(2, {P + "other": half}, [])  # together they do not
    assert engine.current is not None and engine.current.flat["other"] == ""
    (rejected,) = [e for e in logs if e["event"] == "change_rejected"]
    assert "over the" in str(rejected) and "socket protocol" in str(rejected)
    engine.on_etcd_change(3, {P + "lr": b"0.2"}, [])  # a small change still goes through
    assert engine.current.flat["lr"] == 0.2 and published[-1].version == engine.version
    engine.close()


def test_changes_after_a_start_are_published_at_the_revision_it_started_from(
    tmp_path: Path,
) -> None:
    first = make_engine(tmp_path)
    files_start(first)
    first.start({P + "train/lr": b"0.5"}, 17)
    first.close()
    for etcd in ({P + "train/lr": b"0.5"}, None):  # etcd read at 17, or its saved values
        published: list[Published] = []
        engine = make_engine(tmp_path, published=published)
        files_start(engine)
        assert engine.start(etcd, 17 if etcd else 0).revision == 17
        engine.on_files([(tmp_path / "c.yaml", {"train": {"momentum": 0.5}})])
        assert published[-1].version == engine.version and published[-1].revision == 17
        engine.close()


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
    failed = [e for e in logs if e["event"] == "state_write_failed"]
    # The start's try is logged; the change's (a repeat of it) is counted, not logged.
    assert len(failed) == 1 and failed[0]["failures"] == 1
    assert "not reserved on disk" in failed[0]["versions"]
    assert engine.state_write_error is not None
    engine.close()


# --- etcd paths that name no key ---------------------------------------------------------------

STRAYS = ["train//weight_decay", "train.x", "train/lr/", "train.weight_decay"]


@pytest.mark.parametrize("stray", STRAYS)
@pytest.mark.parametrize("with_delete", [False, True])
def test_a_path_that_is_no_key_is_ignored_and_the_keys_beside_it_are_applied(
    tmp_path: Path, stray: str, with_delete: bool
) -> None:
    """Every reader of etcd ignores such a path (README): the daemon too, so the value
    written beside it is in force, as ``hotknob get`` says it is."""
    published: list[Published] = []
    events: list[dict[str, Any]] = []
    engine = make_engine(tmp_path, published=published, events=events)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01", P + "sampling/top_k": b"5"}, 5)
    deletes = [P + "sampling/top_k"] if with_delete else []
    with capture_logs() as logs:
        engine.on_etcd_change(6, {P + "train/lr": b"0.5", P + stray: b"0.1"}, deletes)
    assert engine.version == 2 and published[-1].flat["train.lr"] == 0.5
    assert published[-1].flat["train.weight_decay"] == 0.0
    assert published[-1].flat["sampling.top_k"] == (0 if with_delete else 5)
    expected = {"train.lr": 0.5} if with_delete else {"train.lr": 0.5, "sampling.top_k": 5}
    assert dict(engine.layers["etcd"].values) == expected
    assert not [e for e in logs if e["event"] == "change_rejected"]
    (ignored,) = [e for e in logs if e["event"] == "etcd_path_ignored"]
    assert (ignored["path"], ignored["revision"], ignored["log_level"]) == (P + stray, 6, "warning")
    assert ignored["reason"].startswith("not a key of the schema: ")
    (event,) = [e for e in events if e["event"] == "etcd_path_ignored"]
    assert event["path"] == P + stray and "value" not in event
    assert "0.1" not in str({k: v for k, v in event.items() if k != "time"})  # the value


def test_a_change_of_paths_that_are_no_keys_alone_changes_nothing(tmp_path: Path) -> None:
    published: list[Published] = []
    engine = make_engine(tmp_path, published=published)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01"}, 5)
    with capture_logs() as logs:
        engine.on_etcd_change(6, {P + "train.lr": b"0.5", P + "train//lr": b"0.5"}, [])
    assert engine.version == 1 and len(published) == 1
    ignored = [e["path"] for e in logs if e["event"] == "etcd_path_ignored"]
    assert ignored == [P + "train.lr", P + "train//lr"]
    assert [e["event"] for e in logs if e["log_level"] != "warning"] == []


def test_beside_a_path_that_is_no_key_an_invalid_value_or_unknown_key_still_refuses(
    tmp_path: Path,
) -> None:
    """Only paths that name no key are left out of a change: a key outside the schema, or
    an invalid value, is part of it and refuses it whole, as before."""
    published: list[Published] = []
    engine = make_engine(tmp_path, published=published)
    files_start(engine)
    engine.start({P + "train/lr": b"0.01"}, 5)
    for revision, bad in enumerate(["train/lr", "train/not_a_field"], start=6):
        puts = {P + "train/momentum": b"0.5", P + bad: b"-1", P + "train.x": b"1"}
        with capture_logs() as logs:
            engine.on_etcd_change(revision, puts, [])
        (rejected,) = [e for e in logs if e["event"] == "change_rejected"]
        assert rejected["key"] == bad.replace("/", ".")
        assert [e["path"] for e in logs if e["event"] == "etcd_path_ignored"] == [P + "train.x"]
    assert engine.version == 1 and published[-1].flat["train.momentum"] == 0.9


def test_a_full_read_ignores_paths_that_are_no_keys_with_a_warning(tmp_path: Path) -> None:
    published: list[Published] = []
    engine = make_engine(tmp_path, published=published)
    files_start(engine)
    with capture_logs() as logs:
        engine.start({P + "train/lr": b"0.01", P + "train.lr": b"0.3"}, 5)
    assert [e["path"] for e in logs if e["event"] == "etcd_path_ignored"] == [P + "train.lr"]
    assert not [e for e in logs if e["event"] == "change_rejected"]
    with capture_logs() as logs:
        engine.on_etcd_snapshot({P + "train/lr": b"0.02", P + "//train/lr": b"0.3"}, 9)
    assert [e["path"] for e in logs if e["event"] == "etcd_path_ignored"] == [P + "//train/lr"]
    assert engine.version == 2 and published[-1].flat["train.lr"] == 0.02


def test_a_group_tells_its_changes_in_the_order_they_came(tmp_path: Path) -> None:
    # In a group the accepted changes are told after its one push: a refused or ignored one
    # between them waits for that too, else watch and the log put it first.
    events: list[dict[str, Any]] = []
    engine = make_engine(tmp_path, events=events)
    files_start(engine)
    engine.start({}, 1)
    engine.on_etcd_changes(
        [
            (2, {P + "train/lr": b"0.2"}, frozenset()),
            (3, {P + "train/lr": b"-1"}, frozenset()),
            (4, {P + "train/lr": b"0.3"}, frozenset()),
            (5, {P + "train/lr": b"-2"}, frozenset()),
            (6, {P + "train/lr": b"0.4", P + "train.lr": b"1"}, frozenset()),  # one ignored
        ]
    )
    told = [(e["event"], e["revision"]) for e in events if "revision" in e]
    assert told == [
        ("change_accepted", 2),
        ("change_rejected", 3),
        ("change_accepted", 4),
        ("change_rejected", 5),
        *[(e, 6) for e in ("etcd_path_ignored", "change_accepted")],
    ], told
