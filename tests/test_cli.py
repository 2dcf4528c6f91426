"""The operator CLI against a real etcd: exit codes, one-line errors, and every command."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from hotknob.config.schema import TrainParams
from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(90)

APP = "cli"
P = f"/hotknob/{APP}/config/"
WEIGHTED = ["--schema", "tests.test_cli:Weighted"]


class Weighted(BaseModel):
    """A schema with a mapping field: ``--schema tests.test_cli:Weighted``."""

    train: TrainParams = Field(default_factory=TrainParams)
    weights: dict[str, float] = Field(default_factory=dict)


class Dated(BaseModel):
    """A schema with a date, which YAML reads as no JSON value: ``tests.test_cli:Dated``."""

    since: datetime.date = datetime.date(2019, 1, 1)


def hk(
    etcd: EtcdServer, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint, env=env)


def revision(etcd: EtcdServer) -> int:
    out = etcd.etcdctl("get", "/", "--prefix", "--keys-only", "-w", "json").stdout
    return int(json.loads(out)["header"]["revision"])


def etcd_value(etcd: EtcdServer, key: str) -> str | None:
    out = etcd.etcdctl("get", P + key, "--print-value-only").stdout.strip()
    return out or None


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_help_on_every_subcommand() -> None:
    done = run_cli("--help")
    assert done.returncode == 0
    commands = "run get explain validate set unset history rollback watch status demo"
    for command in commands.split(" "):
        assert command in done.stdout
        sub = run_cli(command, "--help")
        assert sub.returncode == 0, (command, sub.stderr)
        # which shared options each one lists: tests/test_cli_options.py


def test_get_and_explain_show_provenance(etcd: EtcdServer, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 0.1\n  momentum: 0.3\nsampling:\n  top_p: 0.9\n")
    etcd.etcdctl("put", P + "train/lr", "0.01")
    env = {"HOTKNOB_PARAM_TRAIN__MOMENTUM": "0.4"}
    etcd.etcdctl("put", P + "train/momentum", "0.2")  # shadowed by env
    done = hk(etcd, "get", "train.lr", "--config", str(config), env=env)
    assert done.returncode == 0 and done.stdout.strip() == "0.01"
    done = hk(
        etcd, "explain", "--json", "--config", str(config), "--set", "sampling.top_k=3", env=env
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["not_read"] == [] and document["revision"] == revision(etcd)
    rows = {row["key"]: row for row in document["keys"]}
    assert rows["train.lr"]["from"] == "etcd"
    assert rows["train.lr"]["layers"] == {"defaults": 0.001, "files": 0.1, "etcd": 0.01}
    assert rows["train.momentum"]["from"] == "env"
    assert rows["train.momentum"]["shadowed"] == ["files", "etcd"]
    assert rows["sampling.top_p"]["from"] == "files"
    assert rows["sampling.top_k"]["from"] == "cli"
    assert rows["train.weight_decay"]["from"] == "defaults"
    table = hk(etcd, "explain", "train.momentum", "--config", str(config), env=env).stdout
    assert "0.2*" in table and "shadowed by a higher layer" in table
    assert "restart-only" not in table and "not read here" not in table
    assert rows["train.batch_size"]["restart_only"] is True
    assert not any(row["restart_only"] for key, row in rows.items() if key != "train.batch_size")
    table = hk(etcd, "explain", "train.batch_size").stdout
    assert "32^" in table and "^ restart-only:" in table
    # Its "-" under files is no "nothing there": no file was read.
    assert "- not read here: files (no --config given); what each process runs" in table


def test_error_exit_codes(etcd: EtcdServer, tmp_path: Path) -> None:
    line = one_line_error(
        run_cli("get", "--etcd-endpoints", "127.0.0.1:1", "--etcd-timeout", "1"), 3
    )
    assert "cannot reach etcd" in line
    line = one_line_error(hk(etcd, "get", "--set", "train.lr"), 2)
    assert "KEY=VALUE" in line
    line = one_line_error(hk(etcd, "get", "--set", "train.lr=-1"), 1)
    assert "train.lr (from cli)" in line
    line = one_line_error(hk(etcd, "get", "--config", str(tmp_path / "missing.yaml")), 1)
    assert "no such file" in line
    line = one_line_error(run_cli("get", "--schema", "nope.mod:X"), 1)
    assert "cannot import schema module" in line
    for command in ("get", "explain"):  # invalid input, as for set: 1, not a usage error
        line = one_line_error(hk(etcd, command, "train.nope"), 1)
        assert line == "hotknob: train.nope: not a key of the schema"
    line = one_line_error(run_cli("explain", "--precedence", "cli,env"), 2)
    assert "--precedence" in line
    line = one_line_error(run_cli("watch", "--count", "-1"), 2)
    assert "--count must be 0" in line
    line = one_line_error(run_cli("get", "--env-prefix", ""), 2)
    assert "--env-prefix is empty" in line
    done = run_cli("run", "--env-prefix", "")  # its log line, then the error's
    assert done.returncode == 2 and "hotknob: --env-prefix is empty" in done.stderr
    one_line_error(run_cli("frobnicate"), 2)


def test_every_write_without_etcd_endpoints_is_a_usage_error() -> None:
    # Without endpoints the etcd layer reads as empty: a dry run or an unset would report
    # what etcd may hold as absent ("nothing to do") and exit 0.
    env = {"HOTKNOB_ETCD_ENDPOINTS": ""}
    for args in (
        ("set", "train.lr=0.1"),
        ("set", "--dry-run", "train.lr=0.1"),
        ("unset", "train.lr"),
        ("unset", "--dry-run", "train.lr"),
        ("rollback", "--to-revision", "2"),
    ):
        line = one_line_error(run_cli(*args, "--app", APP, env=env), 2)
        assert line == "hotknob: no etcd endpoints: pass --etcd-endpoints or HOTKNOB_ETCD_ENDPOINTS"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_an_output_that_cannot_be_written_is_one_line_not_a_traceback(etcd: EtcdServer) -> None:
    def to_full(*args: str) -> subprocess.CompletedProcess[str]:
        with open("/dev/full", "w") as full:
            return subprocess.run(
                hotknob_cmd(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint),
                stdout=full,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=30,
            )

    line = one_line_error(to_full("get"), 1)
    assert line == "hotknob: [Errno 28] No space left on device"
    line = one_line_error(to_full("set", "train.lr=0.3"), 1)
    assert "No space left on device (the change may be written" in line
    assert etcd_value(etcd, "train/lr") == "0.3"


def test_a_rejected_etcd_value_is_ignored_as_the_daemon_does(etcd: EtcdServer) -> None:
    etcd.etcdctl("put", P + "train/lr", "banana")  # written around hotknob's validation
    done = hk(etcd, "get", "train.lr")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0.001"  # what a daemon with no state of its own runs
    ignored, kept = done.stderr.strip().splitlines()
    assert ignored.startswith("hotknob: warning: ignoring etcd value of train.lr")
    # ...while a daemon that ran a value of train.lr before goes on with it.
    assert "a daemon keeps running what it ran for them" in kept
    done = hk(etcd, "set", "train.momentum=0.5")  # an unrelated bad key does not block a set
    assert done.returncode == 0, done.stderr
    assert etcd_value(etcd, "train/momentum") == "0.5"
    assert etcd_value(etcd, "train/lr") == "banana"
    assert hk(etcd, "set", "train.lr=0.01").returncode == 0  # ...and it can be fixed
    assert hk(etcd, "get", "train.lr").stdout.strip() == "0.01"


def test_validate_files(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[train]\nlr = 0.01\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n  nope: 2\n")
    broken = tmp_path / "broken.json"
    broken.write_bytes(b"\xff\xfe{")
    assert run_cli("validate", str(good)).returncode == 0
    done = run_cli("validate", str(good), str(bad), str(broken))
    assert done.returncode == 1
    assert f"{bad}: train.nope: not a key of the schema" in done.stdout
    # A typo does not hide the other problems of the file: every one is a line.
    assert f"{bad}: train.lr: Input should be greater than 0" in done.stdout
    assert f"{broken}: not valid UTF-8" in done.stdout


def test_set_two_keys_is_one_revision(etcd: EtcdServer) -> None:
    before = revision(etcd)
    done = hk(etcd, "set", "train.lr=1e-4", "train.momentum=0.8")
    assert done.returncode == 0, done.stderr
    assert revision(etcd) == before + 1
    assert etcd_value(etcd, "train/lr") == "0.0001"
    assert etcd_value(etcd, "train/momentum") == "0.8"


def test_invalid_set_writes_nothing(etcd: EtcdServer) -> None:
    before = revision(etcd)
    line = one_line_error(hk(etcd, "set", "train.lr=0.5", "sampling.top_p=2"), 1)
    assert "sampling.top_p" in line and "less than or equal to 1" in line
    line = one_line_error(hk(etcd, "set", "train.nosuch=1"), 1)
    assert "train.nosuch" in line
    assert revision(etcd) == before
    assert etcd_value(etcd, "train/lr") is None


def test_dry_run_and_shadow_warning(etcd: EtcdServer) -> None:
    before = revision(etcd)
    done = hk(etcd, "set", "train.lr=0.3", "--dry-run")
    assert done.returncode == 0 and "0.3" in done.stdout
    assert revision(etcd) == before
    done = hk(etcd, "set", "train.lr=0.3", env={"HOTKNOB_PARAM_TRAIN__LR": "0.9"})
    assert done.returncode == 0
    assert "train.lr is shadowed by the env layer" in done.stderr
    assert etcd_value(etcd, "train/lr") == "0.3"


def test_set_of_a_restart_only_key_warns_that_nothing_changes_live(etcd: EtcdServer) -> None:
    done = hk(etcd, "set", "train.batch_size=64", "train.lr=0.2")
    assert done.returncode == 0, done.stderr
    assert etcd_value(etcd, "train/batch_size") == "64"
    (warning,) = done.stderr.strip().splitlines()
    assert warning.startswith("hotknob: warning: train.batch_size is restart-only:"), warning
    for args in (("set", "train.lr=0.3"), ("set", "train.batch_size=64")):  # no change to it
        done = hk(etcd, *args)
        assert done.returncode == 0 and done.stderr == "", done.stderr
    done = hk(etcd, "unset", "train.batch_size", "--dry-run")
    assert done.returncode == 0 and "train.batch_size is restart-only" in done.stderr


def test_a_key_set_to_null_is_not_shown_as_deleted(etcd: EtcdServer) -> None:
    """``null`` is a value (``train.grad_clip=null``: no clipping), not a deletion: the
    diff of ``set``, ``unset`` and ``--dry-run`` tells the two apart, and an old value
    of null from a key that was not in etcd."""

    def row(done: subprocess.CompletedProcess[str]) -> list[str]:
        assert done.returncode == 0, done.stderr
        (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("train.grad_clip")]
        return line.split()

    assert row(hk(etcd, "set", "train.grad_clip=null")) == ["train.grad_clip", "-", "null"]
    assert etcd_value(etcd, "train/grad_clip") == "null"
    assert row(hk(etcd, "set", "train.grad_clip=1.5")) == ["train.grad_clip", "null", "1.5"]
    assert row(hk(etcd, "set", "train.grad_clip=null")) == ["train.grad_clip", "1.5", "null"]
    dry = hk(etcd, "unset", "train.grad_clip", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {
        "train.grad_clip": {"old": None, "new": None, "existed": True, "deleted": True}
    }
    done = hk(etcd, "unset", "train.grad_clip", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["deleted"] == ["train.grad_clip"]
    assert etcd_value(etcd, "train/grad_clip") is None
    done = hk(etcd, "set", "train.grad_clip=null", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["changed"] == {"train.grad_clip": None} and out["deleted"] == []
    hk(etcd, "set", "train.grad_clip=2")
    assert row(hk(etcd, "unset", "train.grad_clip")) == ["train.grad_clip", "2", "(deleted)"]


def test_unset_is_one_transaction(etcd: EtcdServer) -> None:
    hk(etcd, "set", "train.lr=0.3", "train.momentum=0.2")
    before = revision(etcd)
    done = hk(etcd, "unset", "train.lr", "train.momentum")
    assert done.returncode == 0, done.stderr
    assert revision(etcd) == before + 1
    assert etcd_value(etcd, "train/lr") is None and etcd_value(etcd, "train/momentum") is None


def test_unset_of_a_section_and_of_a_typo(etcd: EtcdServer) -> None:
    hk(etcd, "set", "train.lr=0.3", "train.momentum=0.2", "sampling.top_p=0.5")
    before = revision(etcd)
    line = one_line_error(hk(etcd, "unset", "trian.lr"), 1)  # was "nothing to do", exit 0
    assert "trian.lr: not a key of the schema" in line
    assert revision(etcd) == before
    done = hk(etcd, "unset", "sampling.top_k")  # a key of the schema with no etcd value
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stderr
    done = hk(etcd, "unset", "train", "--json")  # every etcd value under the section
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["changed"] == {"train.lr": None, "train.momentum": None}
    assert revision(etcd) == before + 1
    assert etcd_value(etcd, "train/lr") is None and etcd_value(etcd, "train/momentum") is None
    assert etcd_value(etcd, "sampling/top_p") == "0.5"
    etcd.etcdctl("put", P + "retired/knob", "1")  # a key an older schema had: can be cleaned up
    done = hk(etcd, "unset", "retired")
    assert done.returncode == 0 and etcd_value(etcd, "retired/knob") is None, done.stderr


def test_history_and_compaction(etcd: EtcdServer) -> None:
    for value in ("0.1", "0.2", "0.3"):
        assert hk(etcd, "set", f"train.lr={value}").returncode == 0
    etcd.etcdctl("put", P + "train/lr", "0.4")  # not through hotknob: no time known
    done = hk(etcd, "history", "train.lr", "--json")
    entries = json.loads(done.stdout)["entries"]
    assert [e["value"] for e in entries] == [0.4, 0.3, 0.2, 0.1]
    assert entries[0]["time"] is None and entries[1]["time"] is not None
    revs = [e["revision"] for e in entries]
    assert revs == sorted(revs, reverse=True)
    etcd.etcdctl("compact", str(revs[1]))
    done = hk(etcd, "history", "train.lr")
    assert done.returncode == 0, done.stderr
    assert "0.4" in done.stdout and "0.1" not in done.stdout
    assert "compacted" in done.stdout
    limited = json.loads(hk(etcd, "history", "--limit", "1", "--json").stdout)["entries"]
    assert len(limited) == 1


def test_history_of_a_section_and_of_a_typo(etcd: EtcdServer) -> None:
    """A section's history holds its keys' (as ``unset`` of a section deletes them), and
    the section's own key; a key that is neither in the schema nor ever in etcd is a typo,
    not "no history"."""
    assert hk(etcd, "set", "sampling.temperature=0.7", "sampling.top_p=0.9").returncode == 0
    assert hk(etcd, "set", "sampling.top_k=40").returncode == 0
    etcd.etcdctl("put", P + "sampling", '{"min_p": 0.1}')  # the section's own key
    etcd.etcdctl("put", P + "samplingx/y", "1")  # shares the text, not the section
    done = hk(etcd, "history", "sampling", "--json")
    assert done.returncode == 0, done.stderr
    keys = [e["key"] for e in json.loads(done.stdout)["entries"]]
    assert keys == ["sampling", "sampling.top_k", "sampling.temperature", "sampling.top_p"]
    limited = json.loads(hk(etcd, "history", "sampling", "--limit", "2", "--json").stdout)
    assert [e["key"] for e in limited["entries"]] == ["sampling", "sampling.top_k"]
    table = hk(etcd, "history", "sampling")
    assert "sampling.top_k" in table.stdout and "40" in table.stdout
    line = one_line_error(hk(etcd, "history", "sampling.temprature"), 1)
    assert "sampling.temprature" in line and "not a key of the schema" in line
    # A key no schema has now but etcd held once (an older schema's) has its history.
    etcd.etcdctl("put", P + "retired/knob", "1")
    etcd.etcdctl("del", P + "retired/knob")
    done = hk(etcd, "history", "retired.knob", "--json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)["entries"]
    assert [(e["value"], e["deleted"]) for e in entries] == [(None, True), (1, False)]
    # A key of the schema never set is no mistake.
    done = hk(etcd, "history", "train.warmup_steps")
    assert done.returncode == 0 and "(no history)" in done.stdout, done.stderr


def test_rollback_restores_in_one_revision(etcd: EtcdServer) -> None:
    hk(etcd, "set", "train.lr=0.1", "train.momentum=0.5")
    target = revision(etcd)
    hk(etcd, "set", "train.lr=0.2")
    hk(etcd, "set", "sampling.top_k=5")
    dry = hk(etcd, "rollback", "--to-revision", str(target), "--dry-run")
    assert dry.returncode == 0 and "0.2" in dry.stdout
    before = revision(etcd)
    done = hk(etcd, "rollback", "--to-revision", str(target))
    assert done.returncode == 0, done.stderr
    assert revision(etcd) == before + 1
    assert etcd_value(etcd, "train/lr") == "0.1"
    assert etcd_value(etcd, "sampling/top_k") is None
    assert etcd_value(etcd, "train/momentum") == "0.5"


def test_rollback_deletes_a_stray_section_key_alone(etcd: EtcdServer) -> None:
    """A key at a section's path (written around hotknob) that the target revision lacks is
    deleted by itself: the keys under it that the target has stay."""
    hk(etcd, "set", "train.lr=0.1", "train.momentum=0.5")
    target = revision(etcd)
    etcd.etcdctl("put", P + "train", '{"lr": 0.3}')
    done = hk(etcd, "rollback", "--to-revision", str(target))
    assert done.returncode == 0, done.stderr
    assert etcd_value(etcd, "train") is None
    assert etcd_value(etcd, "train/lr") == "0.1" and etcd_value(etcd, "train/momentum") == "0.5"


def test_watch_prints_changes_made_with_etcdctl(etcd: EtcdServer, tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint) as daemon:
        watch = subprocess.Popen(
            hotknob_cmd("watch", "--app", APP, "--socket", str(daemon.socket_path), "--count", "2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watch.stdout is not None
            first = watch.stdout.readline()
            assert "watching" in first
            etcd.etcdctl("put", P + "train/lr", "0.25")
            etcd.etcdctl("put", "--", P + "train/lr", "-3")
            out, err = watch.communicate(timeout=20)
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
        lines = out.strip().splitlines()
        assert "accepted" in lines[0] and "train.lr=0.25" in lines[0]
        assert "REJECTED" in lines[1] and "train.lr" in lines[1]
        assert watch.returncode == 0, err


def test_watch_without_daemon_is_exit_3(tmp_path: Path) -> None:
    line = one_line_error(run_cli("watch", "--socket", str(tmp_path / "none.sock")), 3)
    assert "no hotknob daemon" in line


def test_status_lists_nothing_cleanly(etcd: EtcdServer) -> None:
    done = hk(etcd, "status")
    assert done.returncode == 0 and "has reported" in done.stdout
    started = time.monotonic()
    assert time.monotonic() - started < 10


DEEP = "[" * 50_000  # decodes to nothing: nested too deeply for a recursive JSON decoder


def test_a_value_nested_too_deeply_is_a_clear_error_from_every_layer(etcd: EtcdServer) -> None:
    line = one_line_error(hk(etcd, "get", "--set", f"train.lr={DEEP}"), 1)
    assert "train.lr (from cli)" in line and "valid number" in line
    line = one_line_error(hk(etcd, "get", env={"HOTKNOB_PARAM_TRAIN__LR": DEEP}), 1)
    assert "train.lr (from env)" in line
    line = one_line_error(hk(etcd, "set", f"train.lr={DEEP}"), 1)
    assert "train.lr (from etcd)" in line
    etcd.etcdctl("put", P + "train/lr", DEEP)  # written around hotknob: ignored, as by a daemon
    done = hk(etcd, "get", "train.lr")
    assert done.returncode == 0 and done.stdout.strip() == "0.001", done.stderr[-300:]
    assert "ignoring etcd value of train.lr" in done.stderr


def test_a_key_below_a_leaf_in_etcd_is_ignored_and_can_be_unset(etcd: EtcdServer) -> None:
    etcd.etcdctl("put", P + "train/lr/x", "1")  # train.lr is a float: nothing lies below it
    for command in (("get", "train.lr"), ("explain", "train.lr")):
        done = hk(etcd, *command)
        assert done.returncode == 0, done.stderr
        assert "ignoring etcd value of train.lr.x: not a key of the schema" in done.stderr
    assert hk(etcd, "get", "train.lr").stdout.strip() == "0.001"
    done = hk(etcd, "set", "train.lr.y=1")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "hotknob: train.lr.y (from etcd): not a key of the schema" in done.stderr
    assert hk(etcd, "set", "train.lr=0.01").returncode == 0
    done = hk(etcd, "unset", "train.lr.x")
    assert done.returncode == 0, done.stderr
    assert etcd_value(etcd, "train/lr/x") is None and etcd_value(etcd, "train/lr") == "0.01"


def test_a_daemon_starts_past_bad_etcd_keys_and_rejects_each(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    etcd.etcdctl("put", P + "train/lr/x", "1")
    etcd.etcdctl("put", P + "train/momentum", DEEP)
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint) as daemon:
        events = daemon.events("change_rejected")
        rejected = {key for e in events for key in e["key"].split(",")}  # at once, or not
        assert {"train.lr.x", "train.momentum"} <= rejected, rejected
        log = daemon.log()
    assert "Traceback" not in log and "RecursionError" not in log


def test_set_checks_a_value_a_higher_layer_shadows(etcd: EtcdServer) -> None:
    env = {"HOTKNOB_PARAM_TRAIN__LR": "0.1"}
    before = revision(etcd)
    line = one_line_error(hk(etcd, "set", "train.lr=-5", env=env), 1)
    assert "train.lr (from etcd)" in line and "greater than 0" in line
    line = one_line_error(hk(etcd, "set", "train.lr=-5", "--set", "train.lr=0.1"), 1)
    assert "train.lr (from etcd)" in line
    line = one_line_error(hk(etcd, "set", "train.lr=1e400", "--dry-run", env=env), 1)
    assert "train.lr (from etcd)" in line and "finite" in line
    assert revision(etcd) == before and etcd_value(etcd, "train/lr") is None
    # One already there (written around hotknob) is reported, and blocks no other change.
    etcd.etcdctl("put", "--", P + "train/lr", "-5")
    done = hk(etcd, "set", "train.momentum=0.5", env=env)
    assert done.returncode == 0, done.stderr
    assert "etcd value of train.lr is invalid" in done.stderr
    assert etcd_value(etcd, "train/momentum") == "0.5" and etcd_value(etcd, "train/lr") == "-5"


def test_a_file_value_a_higher_layer_shadows_is_checked_by_the_commands_too(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A daemon refuses a config file with an invalid value that env, ``--set`` or etcd
    shadows; ``get``, ``explain`` and ``set`` given that file said nothing and exit 0."""
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: -0.5\n")
    pinned = ["--config", str(config), "--set", "train.lr=0.1"]
    for command in (["get", "train.lr"], ["explain", "train.lr"]):
        line = one_line_error(run_cli(*command, *pinned), 1)
        assert f"train.lr (from files: {config})" in line and "greater than 0" in line, line
        assert "without the layers above the files" in line
    hk(etcd, "set", "train.lr=0.2")
    before = revision(etcd)
    line = one_line_error(hk(etcd, "set", "train.momentum=0.5", "--config", str(config)), 1)
    assert f"train.lr (from files: {config})" in line
    assert revision(etcd) == before


def test_rollback_to_a_revision_below_one_is_a_usage_error(etcd: EtcdServer) -> None:
    hk(etcd, "set", "train.lr=0.1")
    before = revision(etcd)
    for rev in ("0", "-5"):
        line = one_line_error(hk(etcd, "rollback", "--to-revision", rev), 2)
        assert "--to-revision" in line
    assert revision(etcd) == before


def test_explain_shows_a_shadowed_value_that_is_not_json(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("since: 2020-01-01\n")  # a date, which no JSON value is
    args = ("--schema", "tests.test_cli:Dated", "--config", str(config))
    args += ("--set", 'since="2021-01-01"')
    done = run_cli("explain", "since", *args)
    assert done.returncode == 0, done.stderr
    assert "2020-01-01*" in done.stdout
    done = run_cli("explain", "--json", *args)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    # No etcd given: no revision (it read none), and said so, as the table's note says it.
    assert document["revision"] is None and document["not_read"] == ["etcd"], document
    rows = {row["key"]: row for row in document["keys"]}
    assert rows["since"]["layers"]["files"] == "2020-01-01"


def test_files_no_parser_refuses_are_refused_clearly(tmp_path: Path) -> None:
    unhashable = tmp_path / "unhashable.yaml"
    unhashable.write_text("? [a, b]\n: 1\n")
    deep = tmp_path / "deep.json"
    deep.write_text('{"a":' * 990 + "1" + "}" * 990)  # parses, but no config is this deep
    done = run_cli("validate", str(unhashable), str(deep))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-300:]
    assert f"{unhashable}: not valid YAML" in done.stdout and "unhashable key" in done.stdout
    assert f"{deep}: nested too deeply" in done.stdout
    for path in (unhashable, deep):
        line = one_line_error(run_cli("get", "--config", str(path)), 1)
        assert str(path) in line


def test_status_shows_entries_of_any_shape(etcd: EtcdServer) -> None:
    status = f"/hotknob/{APP}/status/"
    etcd.etcdctl("put", status + "node1/a", "[1, 2]")
    etcd.etcdctl("put", status + "node1/b", "not json")
    odd = {"time": "soon", "errors": ["boom", {"error": "bad"}, 3], "metrics": [1], "rank": [0]}
    etcd.etcdctl("put", status + "node1/c", json.dumps(odd))
    etcd.etcdctl("put", status + "node1/d", json.dumps({"errors": "oops", "time": 1e300}))
    done = hk(etcd, "status")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-300:]
    assert "boom; bad; 3" in done.stdout and "oops" in done.stdout
    assert "skipping status entry node1/a" in done.stderr
    done = hk(etcd, "status", "--json")
    assert done.returncode == 0, done.stderr
    keys = [p["key"] for p in json.loads(done.stdout)["processes"]]
    assert keys == ["node1/c", "node1/d"]


def test_status_ages_read_in_the_unit_that_matters(etcd: EtcdServer) -> None:
    status = f"/hotknob/{APP}/status/"
    now = time.time()
    ages = {"hours": now - 3 * 3600 - 30, "days": now - 2 * 86400 - 100, "ahead": now + 50}
    for name, when in ages.items():
        entry = {"client": name, "version": 1, "step": 5, "time": when}
        etcd.etcdctl("put", status + f"node1/{name}", json.dumps(entry))
    done = hk(etcd, "status")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    assert rows["node1/hours"][4] == "3h00m"
    assert rows["node1/days"][4] == "2d00h"
    assert rows["node1/ahead"][4] == "0.0s"  # another host's clock ahead: no negative age


def test_status_says_how_old_each_process_s_latest_report_is(etcd: EtcdServer) -> None:
    # STEP and AGE are the applied change's: a process that stopped reporting (hung, or
    # done) looked like one that reports every step; the METRICS column says.
    status = f"/hotknob/{APP}/status/"
    now = time.time()
    metrics = {"step": 3176, "time": now - 125, "latest": {"loss": 0.41}, "mean": {}}
    entry = {"client": "a", "version": 1, "step": 5, "time": now - 3600, "metrics": metrics}
    etcd.etcdctl("put", status + "node1/a", json.dumps(entry))
    odd = {**entry, "metrics": {**metrics, "time": "soon"}}  # written around hotknob
    etcd.etcdctl("put", status + "node1/b", json.dumps(odd))
    done = hk(etcd, "status")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    # The report is 125 s old when written; the CLI reads it a moment later (seconds on a
    # loaded machine), so the age shown is 2m05s or a little more, never less.
    age = re.search(r"loss=0\.41 \(step 3176, 2m(\d\d)s ago\)$", rows["node1/a"])
    assert age is not None and 5 <= int(age.group(1)) <= 35, rows
    assert rows["node1/b"].endswith("loss=0.41"), rows


def test_status_summary_counts_the_processes_by_revision(etcd: EtcdServer) -> None:
    status = f"/hotknob/{APP}/status/"
    for name, revision in (("n1/a", 9), ("n1/b", 9), ("n2/a", 7)):
        entry = {"client": name[3:], "node": name[:2], "version": 1, "revision": revision}
        etcd.etcdctl("put", status + name, json.dumps(entry))
    done = hk(etcd, "status", "--summary")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("3 processes on 2 nodes, etcd at revision "), lines
    assert lines[1:] == ["revision 9: 2 processes", "revision 7: 1 process: n2/a", "reports: none"]
    done = hk(etcd, "status", "--summary", "--json")  # --json has every entry whole
    assert done.returncode == 2 and "not allowed with argument" in done.stderr, done.stderr


def test_a_write_landing_while_set_checks_makes_it_fail_and_write_nothing(
    etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hotknob.daemon import cli, etcd_store

    commit = etcd_store.EtcdStore.commit

    def commit_after_another_write(self: etcd_store.EtcdStore, *args: Any, **kw: Any) -> int:
        # Another operator's set (its own process) lands after this one read and checked.
        assert hk(etcd, "set", "train.momentum=0.5").returncode == 0
        return commit(self, *args, **kw)

    monkeypatch.setattr(etcd_store.EtcdStore, "commit", commit_after_another_write)
    code = cli.main(["set", "train.lr=0.02", "--app", APP, "--etcd-endpoints", etcd.endpoint])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "another write landed" in err and "nothing was written: run it again" in err
    assert etcd_value(etcd, "train/lr") is None
    assert etcd_value(etcd, "train/momentum") == "0.5"
    monkeypatch.setattr(etcd_store.EtcdStore, "commit", commit)
    assert cli.main(["set", "train.lr=0.02", "--app", APP, "--etcd-endpoints", etcd.endpoint]) == 0
    assert etcd_value(etcd, "train/lr") == "0.02"


def test_a_usage_error_names_the_program_once() -> None:
    top = run_cli("get", "--nope")
    assert one_line_error(top, 2) == "hotknob: unrecognized arguments: --nope"
    sub = run_cli("set")
    assert one_line_error(sub, 2) == "hotknob: set: the following arguments are required: KEY=VALUE"


def test_set_refuses_a_key_whose_etcd_path_no_reader_takes_for_it(etcd: EtcdServer) -> None:
    """``weights.c/`` would be written at ``weights/c/`` (no key), ``weights.a/b`` at
    ``weights/a/b`` (read back as ``weights.a.b``): refused, and nothing is written."""
    before = revision(etcd)
    for pair in ("weights.c/=1", "weights.a/b=1", "weights./c=1"):
        line = one_line_error(hk(etcd, "set", *WEIGHTED, pair, "train.lr=0.5"), 1)
        key = pair.split("=")[0]
        assert line.startswith(f"hotknob: {key} (from etcd): has no etcd path: a '/' inside"), line
    assert revision(etcd) == before
    done = hk(etcd, "set", *WEIGHTED, 'weights={"a/b": 1}')  # the mapping written whole
    assert done.returncode == 0, done.stderr
    got = hk(etcd, "get", *WEIGHTED, "weights", "--json")
    assert json.loads(got.stdout) == {"a/b": 1.0}, got.stderr


def test_unset_of_a_key_of_a_mapping_field_twice(etcd: EtcdServer) -> None:
    assert hk(etcd, "set", *WEIGHTED, "weights.head=0.5").returncode == 0
    done = hk(etcd, "unset", *WEIGHTED, "weights.head")
    assert done.returncode == 0 and etcd_value(etcd, "weights/head") is None, done.stderr
    before = revision(etcd)
    done = hk(etcd, "unset", *WEIGHTED, "weights.head")  # as `unset train.lr` twice
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stderr
    done = hk(etcd, "unset", *WEIGHTED, "weights.never")
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stderr
    assert revision(etcd) == before
    line = one_line_error(hk(etcd, "unset", *WEIGHTED, "train.lr.x"), 1)
    assert "train.lr.x: not a key of the schema" in line
    line = one_line_error(hk(etcd, "unset", *WEIGHTED, "weights.never.set"), 1)
    assert "weights.never.set: not a key of the schema" in line  # below a number, as above


def test_get_of_a_key_of_a_mapping_field_shows_the_value_inside(etcd: EtcdServer) -> None:
    assert hk(etcd, "set", *WEIGHTED, "weights.head=0.5").returncode == 0
    done = hk(etcd, "get", *WEIGHTED, "weights.head")
    assert (done.returncode, done.stdout.strip()) == (0, "0.5"), done.stderr
    line = one_line_error(hk(etcd, "get", *WEIGHTED, "weights.nope"), 1)
    assert line == "hotknob: weights.nope: weights holds no such key"
    done = hk(etcd, "explain", *WEIGHTED, "weights.head")  # the row of the leaf that holds it
    assert done.returncode == 0 and done.stdout.splitlines()[1].startswith("weights "), done.stdout
    line = one_line_error(hk(etcd, "explain", *WEIGHTED, "weights.nope"), 1)
    assert line == "hotknob: weights.nope: weights holds no such key"


def test_set_warns_of_a_key_of_a_mapping_a_higher_layer_gives_whole(etcd: EtcdServer) -> None:
    done = hk(etcd, "set", *WEIGHTED, "--set", 'weights={"head": 9}', "weights.head=0.5")
    assert done.returncode == 0 and etcd_value(etcd, "weights/head") == "0.5", done.stderr
    assert done.stderr.strip() == (
        "hotknob: warning: weights.head is shadowed by the cli layer (effective value 9.0): "
        "the etcd value has no effect while that is set"
    )
    done = hk(etcd, "explain", *WEIGHTED, "--set", 'weights={"head": 9}', "weights")
    assert done.returncode == 0 and '{"head":0.5}*' in done.stdout, done.stdout


def test_rollback_leaves_paths_that_are_no_keys_as_they_are(etcd: EtcdServer) -> None:
    """The target revision held paths that name no key: they cannot be restored as keys,
    and rollback neither writes nor deletes them; the keys are rolled back."""
    hk(etcd, "set", "train.lr=0.1")
    etcd.etcdctl("put", P + "train.momentum", "0.3")
    etcd.etcdctl("put", P + "train//weight_decay", "0.1")
    target = revision(etcd)
    hk(etcd, "set", "train.lr=0.2")
    etcd.etcdctl("del", P + "train.momentum")
    before = revision(etcd)
    done = hk(etcd, "rollback", "--to-revision", str(target))
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert revision(etcd) == before + 1
    assert etcd_value(etcd, "train/lr") == "0.1"
    assert etcd_value(etcd, "train.momentum") is None  # not written back
    assert etcd_value(etcd, "train//weight_decay") == "0.1"  # not deleted
    for path in ("train.momentum", "train//weight_decay"):
        warning = f"ignoring etcd value of {P}{path} at revision {target}: not a key"
        assert warning in done.stderr and "rollback leaves that path as it is" in done.stderr


def test_rollback_to_a_value_that_cannot_be_read_is_refused(etcd: EtcdServer) -> None:
    hk(etcd, "set", "train.lr=0.1")
    etcd.etcdctl("put", P + "train/momentum", '"\\ud800"')
    target = revision(etcd)
    hk(etcd, "set", "train.momentum=0.2")
    before = revision(etcd)
    line = one_line_error(hk(etcd, "rollback", "--to-revision", str(target)), 1)
    assert "train.momentum (from etcd): not valid text" in line
    assert revision(etcd) == before


def test_set_warns_of_a_key_the_environment_of_a_daemon_holds(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # The daemon's container pins train.lr in its environment; set, run elsewhere, cannot
    # see that layer: it read the daemons' status entries, which say so.
    pin = {"HOTKNOB_PARAM_TRAIN__LR": "0.001"}
    with (
        DaemonProcess(
            tmp_path, app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"], env=pin
        ) as d,
        RawClient(d.socket_path, "p1") as client,
    ):
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
        wait_for_status = time.monotonic() + 20
        while "pinned" not in (etcd_entry := _status_entry(etcd, "n1/p1")):
            assert time.monotonic() < wait_for_status, etcd_entry
            time.sleep(0.1)
        assert etcd_entry["pinned"] == {"train.lr": "env"}
        held = (
            "warning: train.lr is held by the env layer on the daemon of 1 process(es) (n1/p1): "
            "the etcd value has no effect there"
        )
        before = revision(etcd)
        done = hk(etcd, "set", "--dry-run", "train.lr=0.01")  # a dry run warns as the real one
        assert done.returncode == 0 and held in done.stderr, done.stderr
        assert revision(etcd) == before
        done = hk(etcd, "set", "train.lr=0.01")
        assert done.returncode == 0 and held in done.stderr, done.stderr
        done = hk(etcd, "set", "train.momentum=0.5")
        assert done.returncode == 0 and "held by" not in done.stderr, done.stderr


def _status_entry(etcd: EtcdServer, name: str) -> dict[str, Any]:
    done = etcd.etcdctl("get", f"/hotknob/{APP}/status/{name}", "--print-value-only")
    return dict(json.loads(done.stdout)) if done.stdout.strip() else {}
