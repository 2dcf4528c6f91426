"""What ``set --guard`` checks and says at the moment it is run: a dry run refuses and
warns as the real run would, a change that alters nothing says that no guard was armed, a
guard on restart-only keys alone is warned of at once, and a metric name with "/" (as
training logs name them) can be guarded. Real etcd, a real daemon, raw clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hotknob.config.errors import InvalidInput
from hotknob.daemon.guard_lang import parse_guard
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import APP, P, guard_records, kv, metrics, processes, wait_for
from tests.test_guards_judging import ack

pytestmark = pytest.mark.timeout(120)


def _set(etcd: EtcdServer, *args: str) -> Any:
    return run_cli("set", "--app", APP, "--etcd-endpoints", etcd.endpoint, *args)


def _report(client: RawClient, etcd: EtcdServer, **values: float) -> None:
    """``client`` applies its state and reports ``values`` until its status entry shows them."""
    ack(client, client.snapshot["version"], 0)
    for step in range(1, 4):
        client.send(metrics(step, **values))

    def published() -> bool:
        mine = [p for p in processes(etcd) if p.get("client") == "c1"]
        return bool(mine) and mine[0].get("metrics", {}).get("step") == 3

    wait_for("the reports in status", published)


def _nothing_written(etcd: EtcdServer) -> None:
    assert kv(etcd, P + "train/lr") == (None, 0)
    assert guard_records(etcd) == []


def test_a_dry_run_refuses_and_warns_as_the_real_set_does(etcd: EtcdServer, tmp_path: Path) -> None:
    """c1 reports ``loss``. ``--guard "loss < baseline(los)"`` is refused by the real
    ``set`` (no process reports ``los``, so there is no baseline) and ``los < 2`` is
    warned of; with ``--dry-run`` the first said ``would write`` (exit 0) and the second
    said nothing of ``los``. The dry run refuses and warns the same, writing nothing."""
    baseline_typo = ["train.lr=0.5", "--guard", "loss < baseline(los)", "--window", "5"]
    metric_typo = ["train.lr=0.5", "--guard", "los < 2", "--window", "5"]
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"]) as d,
        RawClient(d.socket_path, "c1") as c1,
    ):
        _report(c1, etcd, loss=1.0)
        dry = _set(etcd, *baseline_typo, "--dry-run")
        _nothing_written(etcd)
        dry_warned = _set(etcd, *metric_typo, "--dry-run")
        _nothing_written(etcd)
        real = _set(etcd, *baseline_typo)
        _nothing_written(etcd)
    assert real.returncode == 1, real
    assert "no process of app 't' reports los yet" in real.stderr, real.stderr
    assert dry.returncode == real.returncode, dry
    assert dry.stderr == real.stderr
    assert "would write" not in dry.stdout, dry.stdout
    assert dry_warned.returncode == 0, dry_warned
    assert "would write" in dry_warned.stdout, dry_warned.stdout
    assert (
        "hotknob: warning: no process of app 't' reports los (they report loss): the guard "
        "judges nothing until one does"
    ) in dry_warned.stderr, dry_warned.stderr


def test_a_guarded_set_that_changes_nothing_says_that_no_guard_was_armed(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """etcd holds ``train.lr=0.5`` already, and c1 runs it: ``set train.lr=0.5 --guard ...
    --wait 5`` printed "nothing to do" and exited 0, not a word of the guard, as if it had
    been armed and passed. It still exits 0 (nothing to do), and says that no guard was
    armed; so does its dry run (none would be)."""
    first = _set(etcd, "train.lr=0.5")
    assert first.returncode == 0, first
    before = kv(etcd, P + "train/lr")
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"]) as d,
        RawClient(d.socket_path, "c1") as c1,
    ):
        _report(c1, etcd, loss=1.0)
        guard = ["--guard", "loss < 3", "--window", "5"]
        done = _set(etcd, "train.lr=0.5", *guard, "--wait", "5")
        dry = _set(etcd, "train.lr=0.5", *guard, "--dry-run")
    assert done.returncode == 0, done
    assert done.stdout.startswith("nothing to do"), done.stdout
    assert "hotknob: warning: no guard was armed: nothing changed" in done.stderr, done.stderr
    assert dry.returncode == 0, dry
    assert "hotknob: warning: no guard would be armed" in dry.stderr, dry.stderr
    assert guard_records(etcd) == []
    assert kv(etcd, P + "train/lr") == before


def test_a_guard_on_restart_only_keys_alone_is_warned_of_at_once(etcd: EtcdServer) -> None:
    """``train.batch_size`` is restart-only: no running process applies a change of it,
    so a guard on it alone can never judge it and ended ``abandoned`` 30 s later, with no
    word from ``set``. ``set`` (and its dry run) warns at once, naming the key; a change
    that also holds a live key gets no such warning (the guard judges that one)."""
    guard = ["--guard", "loss < 3", "--window", "5"]
    dry = _set(etcd, "train.batch_size=64", *guard, "--dry-run")
    done = _set(etcd, "train.batch_size=64", *guard)
    mixed = _set(etcd, "train.batch_size=32", "train.lr=0.5", *guard)
    warning = (
        "hotknob: warning: the guard can never judge this change: train.batch_size is restart-only"
    )
    for run in (dry, done, mixed):
        assert run.returncode == 0, run
    assert warning in dry.stderr, dry.stderr
    assert warning in done.stderr, done.stderr
    assert "can never judge" not in mixed.stderr, mixed.stderr
    assert len(guard_records(etcd)) == 2  # it warns; the change and its guard are written


@pytest.mark.parametrize(
    ("text", "metrics_read", "baselines"),
    [
        ("train/loss < 2", {"train/loss"}, set()),
        ("train/loss < 1.5 * baseline", {"train/loss"}, {"train/loss"}),
        ("loss < baseline(eval/loss) and layer/0/grad_norm < 10", {"loss", "layer/0/grad_norm"},
         {"eval/loss"}),
    ],
)  # fmt: skip
def test_a_metric_name_may_join_its_parts_with_a_slash(
    text: str, metrics_read: set[str], baselines: set[str]
) -> None:
    """``train/loss`` (as training logs name their metrics) was refused with "division is
    not supported: multiply instead", which misleads for a metric name."""
    guard = parse_guard(text)
    assert guard.metrics == metrics_read
    assert guard.baselines == baselines
    values = dict.fromkeys(metrics_read, 0.5)
    assert guard.holds(values, dict.fromkeys(baselines, 1.0))
    assert not guard.holds(dict.fromkeys(metrics_read, 100.0), dict.fromkeys(baselines, 1.0))


@pytest.mark.parametrize(
    ("text", "column"),
    [("loss / 2 < 1", 6), ("loss/2 < 1", 5), ("train/ loss < 1", 6), ("loss < 1.5/x", 11)],
)
def test_a_slash_that_is_no_part_of_a_name_says_how_to_write_one(text: str, column: int) -> None:
    """A "/" with a space after it, or before a number, is no part of a metric name: it is
    refused as division, and the message says how a name with "/" is written."""
    with pytest.raises(InvalidInput) as caught:
        parse_guard(text)
    message = str(caught.value)
    assert "division is not supported: multiply instead" in message, message
    assert 'a metric name may join its parts with "/", no spaces around it' in message, message
    assert f"at column {column} " in message, message


def test_a_guard_on_a_metric_name_with_a_slash_is_armed(etcd: EtcdServer, tmp_path: Path) -> None:
    """c1 reports ``train/loss``: ``set --guard "train/loss < 2 * baseline"`` takes its
    baseline and warns of nothing."""
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"]) as d,
        RawClient(d.socket_path, "c1") as c1,
    ):
        _report(c1, etcd, **{"train/loss": 1.0})
        done = _set(etcd, "train.lr=0.5", "--guard", "train/loss < 2 * baseline", "--window", "5")
        (record,) = guard_records(etcd)
    assert done.returncode == 0, done
    assert "warning" not in done.stderr, done.stderr
    assert record["guard"] == "train/loss < 2 * baseline"
    assert record["baselines"] == {"n1/c1": {"train/loss": 1.0}}, record
