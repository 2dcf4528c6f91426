"""Config files refused file by file: each refusal said once per edit, and ``status`` and
``/healthz`` saying what is refused now, not what was refused some edits ago.

Two files refused at once (a team's base file and a run's own file, both in git), one of
them then fixed: what is said, and what stays said, is each file's own refusal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_engine import make_engine
from tests.test_files_apart import BASE, RUN, rejections, started
from tests.test_metrics_health import daemon as metrics_daemon
from tests.test_metrics_health import free_port, health
from tests.test_state_dir import wait_for

pytestmark = pytest.mark.timeout(60)

LR_BAD = {"train": {"lr": -1}}
MOMENTUM_BAD = {"train": {"momentum": -3}}


def test_a_file_refused_again_after_its_fix_is_said_again(tmp_path: Path) -> None:
    """The base refused, the run refused beside it, the base fixed back to exactly its
    last good contents, then saved with the refused value again: a new edit, said."""
    events: list[dict[str, Any]] = []
    engine, base, run = started(tmp_path, events)
    engine.on_files([(base, LR_BAD), (run, RUN)])
    engine.on_files([(base, LR_BAD), (run, MOMENTUM_BAD)])
    # Each file's own refusal: the base's, said before and unchanged, is no part of it.
    assert [r["new"] for r in rejections(events)] == [{"train.lr": -1}, {"train.momentum": -3}]
    engine.on_files([(base, BASE), (run, MOMENTUM_BAD)])  # the base back to what is in force
    assert len(rejections(events)) == 2  # the run's contents: said already
    engine.on_files([(base, LR_BAD), (run, MOMENTUM_BAD)])
    assert len(rejections(events)) == 3, "the base's new edit was never said"
    assert rejections(events)[-1]["new"] == {"train.lr": -1}
    assert engine.current is not None and engine.current.flat["train.lr"] == 0.05
    engine.close()


def test_what_is_refused_is_each_file_that_is_refused_now(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    engine, base, run = started(tmp_path, events)
    engine.on_files([(base, LR_BAD), (run, MOMENTUM_BAD)])  # both refused, in one save
    assert [r["new"] for r in rejections(events)] == [{"train.lr": -1}, {"train.momentum": -3}]
    engine.on_files([(base, BASE), (run, MOMENTUM_BAD)])
    assert engine.files_rejected is not None
    assert "train.momentum" in engine.files_rejected and "train.lr" not in engine.files_rejected
    assert engine.on_files([(base, BASE), (run, {"train": {"momentum": 0.5}})])
    assert engine.files_rejected is None
    engine.close()


def test_a_restart_on_a_refused_file_does_not_refuse_it_again_at_another_files_edit(
    tmp_path: Path,
) -> None:
    """Said at the start (``config_files_refused_at_start``, ``status``): the next edit of
    another file lands without a new rejection of the unchanged base."""
    events: list[dict[str, Any]] = []
    engine, base, run = started(tmp_path, events)
    engine.on_files([(base, LR_BAD), (run, RUN)])
    engine.close()

    events.clear()
    later = make_engine(tmp_path, events=events)
    later.start({}, 1, files=[(base, LR_BAD), (run, RUN)])
    assert later.files_refused is not None
    assert not later.on_files([(base, LR_BAD), (run, {"train": {"momentum": 0.5}})])
    assert later.current is not None and later.current.flat["train.momentum"] == 0.5
    assert rejections(events) == [], "the base's refusal said again, though not edited"
    assert later.files_rejected is not None and "train.lr" in later.files_rejected
    later.close()


def _save(path: Path, text: str) -> None:
    aside = path.with_suffix(".tmp")
    aside.write_text(text)
    os.replace(aside, path)


def test_healthz_drops_the_refusal_of_a_file_fixed_beside_another_refused(
    tmp_path: Path,
) -> None:
    base, team = tmp_path / "base.yaml", tmp_path / "team.toml"
    base.write_text("train:\n  lr: 0.05\n")
    team.write_text("[train]\nmomentum = 0.8\n")
    proc, port = metrics_daemon(tmp_path, extra=("--config", str(base), "--config", str(team)))
    with proc, RawClient(proc.socket_path, "c1") as client:
        _save(base, "train:\n  lr: -1\n")
        wait_for(lambda: len(proc.events("change_rejected")) == 1)
        _save(team, "[train]\nmomentum = -3\n")
        wait_for(lambda: len(proc.events("change_rejected")) == 2)
        assert proc.events("change_rejected")[1]["key"] == "train.momentum"
        _save(team, "[train]\nmomentum = 0.8\n")  # fixed: back to its last good contents
        wait_for(lambda: str(team) not in health(port)[1]["config_files"].get("rejected", ""))
        rejected = health(port)[1]["config_files"]["rejected"]
        assert f"train.lr (from files: {base})" in rejected, "the base, still refused, not said"
        _save(base, "train:\n  lr: 0.06\n")
        assert client.next_update()["changed"] == {"train.lr": 0.06}
        wait_for(lambda: health(port)[1]["config_files"] == {})
        assert len(proc.events("change_rejected")) == 2


def test_a_file_refused_beside_an_etcd_value_lands_once_etcd_drops_it(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """``band.hi`` saved below etcd's ``band.lo``: refused. Once etcd no longer holds
    ``band.lo``, the save fits, and no edit of the file will come to take it."""
    band = tmp_path / "band.yaml"
    band.write_text("band:\n  hi: 8\n")
    schema = ("--schema", "tests.banded_schema:Banded")
    port = free_port()
    extra = [*schema, "--metrics-addr", f"127.0.0.1:{port}", "--config", str(band)]
    proc = DaemonProcess(tmp_path, app="t", endpoints=etcd.endpoint, extra=extra)

    def hk(*args: str) -> None:
        done = run_cli(*args, "--app", "t", "--etcd-endpoints", etcd.endpoint, *schema)
        assert done.returncode == 0, done.stderr

    with proc, RawClient(proc.socket_path, "c1") as client:
        hk("set", "band.lo=6", "--config", str(band))
        assert client.next_update()["changed"] == {"band.lo": 6.0}
        _save(band, "band:\n  hi: 5\n")
        wait_for(lambda: "rejected" in health(port)[1]["config_files"])
        hk("unset", "band.lo")
        assert client.next_update()["changed"] == {"band.lo": 0.0}
        assert client.next_update()["changed"] == {"band.hi": 5.0}
        wait_for(lambda: health(port)[1]["config_files"] == {})
