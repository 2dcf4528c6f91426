"""Several operators at once: what each one's ``set --wait`` says of *their own* change
when another operator's write of the same key lands before the processes ran it, or a
write of another key that a daemon refuses; and a ``rollback`` that another operator's
``set`` lands in the middle of.

Real etcd, a real daemon, a client speaking the protocol, and the CLI as a user runs it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon import cmd_etcd
from hotknob.daemon.cli import main
from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import wait_for
from tests.test_guards_judging import ack
from tests.test_review_ops import entries
from tests.test_rollout import Acking

pytestmark = pytest.mark.timeout(60)

APP = "t"  # as tests.test_review_ops's entries reads it
P = f"/hotknob/{APP}/config/"


def hk(etcd: EtcdServer, *args: str) -> Any:
    return run_cli(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint)


def started(etcd: EtcdServer, *args: str) -> subprocess.Popen[str]:
    """``hotknob ARGS`` running in the background, as from another terminal."""
    return subprocess.Popen(
        hotknob_cmd(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def etcd_value(etcd: EtcdServer, key: str) -> str:
    return etcd.etcdctl("get", P + key, "--print-value-only").stdout.strip()


@pytest.fixture
def acking(etcd: EtcdServer, tmp_path: Path) -> Iterator[Acking]:
    """A daemon (node n1) and one process on it that applies every change it gets."""
    with (
        DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"]) as d,
        Acking(d, "p1") as process,
    ):
        wait_for("its status entry", lambda: "n1/p1" in entries(etcd))
        yield process


def test_a_set_wait_whose_value_another_operator_overwrote_does_not_say_applied(
    etcd: EtcdServer, acking: Acking
) -> None:
    """Operator A sets train.lr=0.1 --wait while the process is busy (not applying);
    operator B sets train.lr=0.2 before it applies anything. The process then runs B's
    revision, which is later than A's, and runs 0.2: A must not be told that its change
    was applied (exit 0), but that B's write overwrote it before the process ran it."""
    acking.paused.set()
    first = started(etcd, "set", "train.lr=0.1", "--wait", "30", "--json")
    wait_for("A's write", lambda: etcd_value(etcd, "train/lr") == "0.1")
    acking.paused.clear()
    second = hk(etcd, "set", "train.lr=0.2", "--wait", "30", "--json")
    out, err = first.communicate(timeout=40)
    # A's change is not in force: exit 1, one line saying which write overwrote it.
    assert first.returncode == 1, (out, err)
    # B's is: applied.
    assert second.returncode == 0, (second.stdout, second.stderr)
    b = json.loads(second.stdout)
    assert b["wait"]["applied"] == ["n1/p1"] and b["wait"]["overtaken"] == [], b
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"hotknob: revision {json.loads(out)['revision']} is written, but"), line
    assert f"a later write changed train.lr (again, at revision {b['revision']})" in line, line
    assert "1 of 1 processes (n1/p1) run its values, not this change's" in line, line
    assert "`hotknob history train.lr`" in line, line
    a = json.loads(out)
    assert a["changed"] == {"train.lr": 0.1}, a
    assert a["wait"]["overwritten"] == {"train.lr": b["revision"]}, a
    assert a["wait"]["overtaken"] == ["n1/p1"], a
    assert "applied by" not in out


def test_another_operator_s_refused_write_of_another_key_does_not_reject_this_one(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A sets train.lr --wait; its process is inside a long step (it got the change, has
    not applied it yet); B sets sampling.temperature=1.5, which the daemon (a stricter
    schema) refuses. The daemon still runs A's change and the process applies it at its
    next step: A was told its change was rejected, for B's key, and exit 1."""
    strict = ["--node", "n1", "--schema", "tests.test_rollout:Strict"]
    with (
        DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=strict) as daemon,
        RawClient(daemon.socket_path, "p1") as process,
    ):
        ack(process, process.snapshot["version"], 1)
        wait_for("its status entry", lambda: "n1/p1" in entries(etcd))
        first = started(etcd, "set", "train.lr=0.3", "--wait", "30", "--json")
        update = process.next_update(timeout=30)  # A's change, held through a long step
        second = hk(etcd, "set", "sampling.temperature=1.5")
        assert second.returncode == 0, second.stderr
        wait_for("the refusal", lambda: "rejected" in entries(etcd)["n1/p1"])
        time.sleep(0.5)  # A's wait has seen it
        ack(process, update["version"], 2)
        out, err = first.communicate(timeout=40)
    assert first.returncode == 0, (out, err)
    result = json.loads(out)
    assert result["wait"]["applied"] == ["n1/p1"] and result["wait"]["rejected"] == {}, result


def test_a_set_landing_while_a_rollback_reads_makes_it_fail_not_half_done(
    etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rollback`` reads the config once to find what to restore and again to check and
    write it. Another operator's ``set`` of a key the old state lacks, landing between
    the two reads, was kept (the rollback deleted only what the first read held) while
    the rollback said it restored the state: it must fail and write nothing instead."""
    assert hk(etcd, "set", "train.lr=0.1").returncode == 0
    target = json.loads(hk(etcd, "set", "train.lr=0.2", "--json").stdout)["revision"] - 1
    real = cmd_etcd.read_all_layers
    reads: list[int] = []

    def then_another_set(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        reads.append(found[2])
        if len(reads) == 1:  # the other operator, between the rollback's two reads
            assert hk(etcd, "set", "train.momentum=0.8").returncode == 0
        return found

    monkeypatch.setattr(cmd_etcd, "read_all_layers", then_another_set)
    code = main(
        ["rollback", "--to-revision", str(target), "--app", APP,
         "--etcd-endpoints", etcd.endpoint]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert len(reads) == 2, reads
    assert code == 1, (out, err)
    assert "another write landed at revision" in err and "nothing was written" in err, err
    assert etcd_value(etcd, "train/lr") == "0.2"  # as the other operator left it
    assert etcd_value(etcd, "train/momentum") == "0.8"
    # Run again, it restores the state at that revision whole.
    monkeypatch.setattr(cmd_etcd, "read_all_layers", real)
    assert hk(etcd, "rollback", "--to-revision", str(target)).returncode == 0
    assert etcd_value(etcd, "train/lr") == "0.1"
    assert etcd_value(etcd, "train/momentum") == ""
