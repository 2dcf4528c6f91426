"""A value the schema refuses in one config file holds back no edit of the others.

Each file is edited on its own (a team's base file, a run's overrides): the engine tries
each edited file alone on the contents in force when the files together are refused.
Engine-level tests feed it parsed contents; the last one runs a real daemon on real
files, as an operator would edit them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hotknob.config import files_layer
from hotknob.daemon.engine import Engine
from tests.banded_schema import Banded
from tests.daemon_proc import RawClient
from tests.test_engine import make_engine
from tests.test_metrics_health import daemon as metrics_daemon
from tests.test_metrics_health import health
from tests.test_state_dir import wait_for

BASE = {"train": {"lr": 0.05}}
RUN = {"train": {"momentum": 0.8}}


def rejections(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "change_rejected"]


def started(tmp_path: Path, events: list[dict[str, Any]]) -> tuple[Engine, Path, Path]:
    base, run = tmp_path / "base.yaml", tmp_path / "run.yaml"
    engine = make_engine(tmp_path, events=events)
    engine.start({}, 1, files=[(base, BASE), (run, RUN)])
    return engine, base, run


def test_an_edit_of_one_file_lands_while_another_holds_a_refused_value(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    engine, base, run = started(tmp_path, events)
    assert not engine.on_files([(base, {"train": {"lr": -1}}), (run, RUN)])
    (first,) = rejections(events)
    assert [p["path"] for p in first["problems"]] == [str(base)]

    # The run's own file is edited, the base still refused: its edit is taken.
    taken = engine.on_files([(base, {"train": {"lr": -1}}), (run, {"train": {"momentum": 0.5}})])
    assert not taken, "a file still refused: not all was taken"
    assert engine.current is not None
    assert engine.current.flat["train.momentum"] == 0.5
    assert engine.current.flat["train.lr"] == 0.05  # the base's contents in force
    assert engine.version == 2
    assert len(rejections(events)) == 1, "the same refused contents announced again"
    accepted = [e for e in events if e.get("event") == "change_accepted"]
    assert accepted[-1]["changed"] == {"train.momentum": 0.5}

    # Edited again, still refused, with another value: said, and only of the base.
    engine.on_files([(base, {"train": {"lr": -2}}), (run, {"train": {"momentum": 0.5}})])
    second = rejections(events)[-1]
    assert len(rejections(events)) == 2 and second["new"] == {"train.lr": -2}

    # Fixed: taken whole, and said so (True: nothing refused any more).
    assert engine.on_files([(base, {"train": {"lr": 0.07}}), (run, {"train": {"momentum": 0.5}})])
    assert engine.current.flat["train.lr"] == 0.07
    engine.close()

    # What the state file saved is what ran: a restart on the files refused starts on it.
    later = make_engine(tmp_path)
    assert later.saved_files([base, run]) == {
        base: {"train": {"lr": 0.07}},
        run: {"train": {"momentum": 0.5}},
    }


def test_what_ran_is_saved_file_by_file_for_a_restart(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    engine, base, run = started(tmp_path, events)
    edited = [(base, {"train": {"lr": -1}}), (run, {"train": {"momentum": 0.5}})]
    assert not engine.on_files(edited)  # both edited at once: the run's taken
    assert engine.current is not None and engine.current.flat["train.momentum"] == 0.5
    (refused,) = rejections(events)
    assert refused["new"] == {"train.lr": -1}, "the refusal names only the base's edit"
    engine.close()

    later = make_engine(tmp_path)
    assert later.saved_files([base, run]) == {base: BASE, run: {"train": {"momentum": 0.5}}}
    later.start({}, 1, files=edited)  # the base still refused on disk
    assert later.current is not None
    assert later.current.flat["train.lr"] == 0.05 and later.current.flat["train.momentum"] == 0.5
    later.close()


def test_edits_valid_only_together_are_taken_together(tmp_path: Path) -> None:
    lo, hi = tmp_path / "lo.yaml", tmp_path / "hi.yaml"
    engine = make_engine(tmp_path, schema=Banded)
    engine.start({}, 1, files=[(lo, {"band": {"lo": 1}}), (hi, {"band": {"hi": 2}})])
    # Each alone breaks lo <= hi, together they keep it: taken whole.
    assert engine.on_files([(lo, {"band": {"lo": 5}}), (hi, {"band": {"hi": 6}})])
    assert engine.current is not None
    assert engine.current.flat["band.lo"] == 5 and engine.current.flat["band.hi"] == 6
    # Each valid alone, not together: the earlier file's edit is taken.
    assert not engine.on_files([(lo, {"band": {"lo": 6}}), (hi, {"band": {"hi": 5.5}})])
    assert engine.current.flat["band.lo"] == 6 and engine.current.flat["band.hi"] == 6
    engine.close()


def test_one_file_refused_alone_is_said_once_per_contents(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    engine, base, run = started(tmp_path, events)
    assert not engine.on_files([(base, {"train": {"lr": -1}}), (run, RUN)])
    assert not engine.on_files([(base, {"train": {"lr": -1, "momentum": 0.2}}), (run, RUN)])
    assert len(rejections(events)) == 2  # a new edit of the file: said again
    assert (
        engine.layers["files"].values
        == files_layer(engine.schema, [(base, BASE), (run, RUN)]).values
    )
    engine.close()


def test_a_daemon_takes_a_files_edit_beside_another_file_it_refuses(tmp_path: Path) -> None:
    base, run = tmp_path / "base.yaml", tmp_path / "run.yaml"
    base.write_text("train:\n  lr: 0.05\n")
    run.write_text("train:\n  momentum: 0.8\n")
    proc, port = metrics_daemon(tmp_path, extra=("--config", str(base), "--config", str(run)))
    with proc, RawClient(proc.socket_path, "c1") as client:
        base.write_text("train:\n  lr: -1\n")
        wait_for(lambda: proc.events("change_rejected"))
        run.write_text("train:\n  momentum: 0.5\n")
        update = client.next_update()
        assert update["changed"] == {"train.momentum": 0.5}
        assert update["values"]["train"]["lr"] == 0.05
        rejected = proc.events("change_rejected")
        assert len(rejected) == 1 and rejected[0]["key"] == "train.lr"
        # The base is still refused: /healthz says so after the other file's edit landed.
        assert f"train.lr (from files: {base})" in health(port)[1]["config_files"]["rejected"]
        base.write_text("train:\n  lr: 0.07\n")
        assert client.next_update()["changed"] == {"train.lr": 0.07}
        wait_for(lambda: health(port)[1]["config_files"] == {})


def test_the_note_on_files_checked_alone_only_where_a_layer_above_sets_the_key(
    tmp_path: Path,
) -> None:
    """A review found the note "(checked without the layers above the files ...)" at
    every start on a refused file, where no layer above set the key: it sent the reader
    looking for a shadowing value that is not there."""
    import pytest

    from hotknob.config import InvalidChange

    config = tmp_path / "config.yaml"
    with pytest.raises(InvalidChange) as plain:
        make_engine(tmp_path).start({}, 1, files=[(config, {"train": {"lr": -1}})])
    assert "train.lr" in str(plain.value)
    assert "without the layers above the files" not in str(plain.value)

    # etcd sets the key: the note says why a value nobody runs now is refused.
    events: list[dict[str, Any]] = []
    shadowed = make_engine(tmp_path, events=events)
    shadowed.start({"/hotknob/eng/config/train/lr": b"0.1"}, 1, files=[(config, BASE)])
    assert not shadowed.on_files([(config, {"train": {"lr": -1}})])
    (refused,) = rejections(events)
    assert "without the layers above the files" in refused["problems"][0]["reason"]
    shadowed.close()
