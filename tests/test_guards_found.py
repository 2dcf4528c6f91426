"""Guarded changes: cases found by review. A process that will never apply the change (its
daemon refused it, or pins its keys) neither holds a guard armed nor is waited for, and
``set --guard`` copes with non-finite values in etcd and in the reports (real etcd, real
daemons, raw clients, the CLI)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hotknob.config import InvalidInput
from hotknob.daemon.guarded_set import baselines_from
from hotknob.daemon.status_entries import remote_open_windows, remote_watching
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import (
    APP,
    P,
    guard_records,
    guarded_set,
    kv,
    metrics,
    processes,
    report_until_published,
    status_json,
    wait_for,
)
from tests.test_guards_judging import QUICK_ABANDON, ack, ended

pytestmark = pytest.mark.timeout(120)

STRICT = ["--schema", "tests.test_rollout:Strict"]  # refuses sampling.temperature > 1.2


def entry_of(etcd: EtcdServer, client: str) -> dict[str, Any] | None:
    """``client``'s status entry, if it has one."""
    mine = [p for p in processes(etcd) if p["client"] == client]
    return mine[0] if mine else None


@contextmanager
def two_daemons(
    etcd: EtcdServer, tmp_path: Path, n2: list[str], env: dict[str, str]
) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """Daemons of nodes n1 (the built-in schema) and n2 (run with ``n2`` besides)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        DaemonProcess(
            tmp_path / "a", endpoints=etcd.endpoint, extra=["--node", "n1"], env=env
        ) as d1,
        DaemonProcess(
            tmp_path / "b", endpoints=etcd.endpoint, extra=["--node", "n2", *n2], env=env
        ) as d2,
    ):
        yield d1, d2


def test_a_guard_is_abandoned_though_a_process_whose_daemon_refused_the_change_stays(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # n2 refuses the change; n1's only process applies it, reports once and leaves
    # mid-window. c2 stays connected to n2 but never applies it: nobody is left to judge
    # the guard. It stayed armed: c2, behind the change, counted as one that may still
    # apply it, on n1 (from its status entry) and on n2.
    with (
        two_daemons(etcd, tmp_path, STRICT, QUICK_ABANDON) as (d1, d2),
        RawClient(d2.socket_path, "c2") as c2,
    ):
        with RawClient(d1.socket_path, "c1") as c1:
            for client in (c1, c2):
                ack(client, client.snapshot["version"], 0)
            report_until_published(c1, etcd, "c1", range(1, 4))
            out = guarded_set(
                etcd, "sampling.temperature=1.5", "--guard", "loss < 3", "--window", "100"
            )
            ack(c1, c1.next_update()["version"], 10)
            wait_for("armed on both", lambda: d1.events("guard_armed") and d2.events("guard_armed"))
            c1.send(metrics(11, loss=1.0))
            wait_for(
                "c2's entry to say n2 refused it",
                lambda: (
                    ((entry_of(etcd, "c2") or {}).get("rejected") or {}).get("revision")
                    == out["revision"]
                ),
            )
        record = ended(etcd)  # c1 left at step 11
        assert record["state"] == "abandoned", record
        assert record["outcome"]["reason"].endswith("; the change stays"), record
        assert c2.no_message()  # nothing to apply: n2 runs without the change
        assert kv(etcd, P + "sampling/temperature") == ("1.5", out["revision"])
        assert not d1.events("change_reverted") and not d2.events("change_reverted")


def test_a_guard_whose_only_daemon_refused_the_change_is_abandoned(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # Its one process stays connected, behind the change, and reports: it was taken for
    # one that may still apply the change, and the guard stayed armed for good.
    extra = ["--node", "n2", *STRICT]
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=extra, env=QUICK_ABANDON) as d,
        RawClient(d.socket_path, "c2") as c2,
    ):
        ack(c2, c2.snapshot["version"], 0)
        c2.send(metrics(1, loss=1.0))
        out = guarded_set(etcd, "sampling.temperature=1.5", "--guard", "loss < 3", "--window", "10")
        for step in (2, 3, 4):
            c2.send(metrics(step, loss=1.0))
        record = ended(etcd)
        assert record["state"] == "abandoned", record
        reason = record["outcome"]["reason"]
        assert reason == (
            "no process left to judge it: the daemon of n2/c2 refused the change (`hotknob "
            "status` says why); the change stays"
        ), reason
        assert c2.no_message()
        assert kv(etcd, P + "sampling/temperature") == ("1.5", out["revision"])


def test_other_daemons_processes_that_will_never_apply_the_change_are_not_counted() -> None:
    """A process whose daemon refused the change, or pins every one of its keys (a layer
    above etcd holds them there), may not judge the guard, and is not waited for; one
    whose daemon pins only some of them is."""
    prefix = "/hotknob/t/status/"
    guard = "g1"
    lr = {"train.lr": "cli"}
    entries = {
        "n1/here": {"revision": 7},  # this node's: it knows its own
        "n2/behind": {"revision": 7},  # the change not yet published
        "n2/refused": {"revision": 7, "rejected": {"revision": 8, "reason": "too hot"}},
        "n3/pinned": {"revision": 8, "pinned": lr},
        "n3/pinned-behind": {"revision": 7, "pinned": lr},
        "n3/pinned-in-part": {"revision": 8, "pinned": {"train.momentum": "env"}},
        "n4/watched": {"revision": 8, "guards": {guard: {"reported": False}}},
        # Its daemon took revision 9 with a state built at 7: the change altered nothing.
        "n5/unchanged": {"revision": 9, "built": 7},
        "n5/unchanged-behind": {"revision": 7, "built": 6},  # not at the change yet
        "n5/built-at-it": {"revision": 9, "built": 8},  # applied it: its daemon not armed yet
    }
    kvs = {prefix + name: json.dumps(entry).encode() for name, entry in entries.items()}
    keys = ["train.lr"]
    assert remote_watching(kvs, prefix, "n1", guard, 8, keys) == [
        "n2/behind",
        "n4/watched",
        "n5/unchanged-behind",
    ]
    inside, unheard = remote_open_windows(kvs, prefix, "n1", guard, 8, keys)
    assert inside == []
    assert unheard == [
        "n2/behind",
        "n3/pinned-in-part",
        "n4/watched",
        "n5/built-at-it",
        "n5/unchanged-behind",
    ]
    both = ["train.lr", "train.momentum"]
    _, unheard = remote_open_windows(kvs, prefix, "n1", guard, 8, both)
    assert unheard == [
        "n2/behind",
        "n3/pinned",
        "n3/pinned-behind",
        "n3/pinned-in-part",
        "n4/watched",
        "n5/built-at-it",
        "n5/unchanged-behind",
    ]


def guard_passes_without_waiting_for_c2(
    etcd: EtcdServer,
    tmp_path: Path,
    n2: list[str],
    c2_says_so: Callable[[dict[str, Any], int], bool],
) -> None:
    """A guarded ``train.lr=0.05`` over c1 (on n1) and c2 (on n2, run with ``n2`` besides),
    both reporting loss before it. The change alters nothing on n2, and c2 never applies
    it; once c2's entry says so (``c2_says_so(entry, revision)``), the guard passes on c1's
    window alone, neither waiting for c2 nor naming it."""
    quick = {"HOTKNOB_GUARD_REPORT_WAIT_S": "2"}
    with (
        two_daemons(etcd, tmp_path, n2, quick) as (d1, d2),
        RawClient(d1.socket_path, "c1") as c1,
        RawClient(d2.socket_path, "c2") as c2,
    ):
        for client, name in ((c1, "c1"), (c2, "c2")):
            ack(client, client.snapshot["version"], 0)
            report_until_published(client, etcd, name, range(1, 4))
        out = guarded_set(etcd, "train.lr=0.05", "--guard", "loss < 3", "--window", "20")
        assert guard_records(etcd)[0]["reporting"] == ["n1/c1", "n2/c2"]
        ack(c1, c1.next_update()["version"], 10)
        wait_for("armed on both", lambda: d1.events("guard_armed") and d2.events("guard_armed"))
        wait_for("c2's entry", lambda: c2_says_so(entry_of(etcd, "c2") or {}, out["revision"]))
        for step in range(11, 32):
            c1.send(metrics(step, loss=1.0))
            c2.send(metrics(step, loss=1.0))
        record = ended(etcd)
        assert record["state"] == "passed", record
        assert record["outcome"]["reason"] == "held for 20 steps", record
        assert "unheard" not in record["outcome"], record
        assert not d1.events("guard_waiting"), d1.events("guard_waiting")
        assert c2.no_message()
        assert kv(etcd, P + "train/lr") == ("0.05", out["revision"])


def test_a_remote_process_whose_daemon_pins_the_key_is_not_waited_for_nor_named(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # n2 holds train.lr with --set. c2 was waited for, then named in the outcome as one
    # that "applied it but reported no loss".
    guard_passes_without_waiting_for_c2(
        etcd,
        tmp_path,
        ["--set", "train.lr=0.3"],
        lambda entry, _: entry.get("pinned") == {"train.lr": "cli"},
    )


def test_a_remote_process_that_runs_the_guarded_value_already_is_not_waited_for(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # n2's config file holds train.lr 0.05. Its daemon says so in c2's entry: it runs the
    # change's revision with a state built before it. c2 was waited for, then named.
    config = tmp_path / "n2.yaml"
    config.write_text("train:\n  lr: 0.05\n")

    def unchanged(entry: dict[str, Any], revision: int) -> bool:
        built = entry.get("built")
        return entry.get("revision") == revision and isinstance(built, int) and built < revision

    guard_passes_without_waiting_for_c2(etcd, tmp_path, ["--config", str(config)], unchanged)


def test_set_guard_over_an_infinite_value_in_etcd_records_it_as_rejected(
    etcd: EtcdServer,
) -> None:
    # 1e999 in etcd (written around hotknob) reads as an infinity, which the daemon never
    # took: `set --guard` failed with a traceback, as the record could not hold it.
    etcd.etcdctl("put", P + "train/momentum", "1e999")
    done = run_cli(
        "set", "--app", APP, "--etcd-endpoints", etcd.endpoint,
        "train.momentum=0.6", "--guard", "loss < 3", "--window", "10",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert kv(etcd, P + "train/momentum")[0] == "0.6"
    (record,) = guard_records(etcd)
    # A revert deletes a rejected old value: what the layers below etcd say comes back.
    assert record["keys"] == {
        "train.momentum": {"old": "Infinity", "existed": True, "new": 0.6, "rejected": True}
    }
    (shown,) = status_json(etcd)["guards"]
    assert shown["id"] == record["id"] and shown["keys"] == record["keys"]


def test_set_guard_on_a_baseline_whose_recent_mean_is_nan_says_so(etcd: EtcdServer) -> None:
    # The process reports loss, one of its last 32 values NaN: `set` said that no process
    # reports loss, while `status` showed its loss.
    entry = {
        "client": "c1",
        "node": "n1",
        "version": 1,
        "revision": 1,
        "step": 0,
        "metrics": {
            "step": 5,
            "time": time.time(),
            "latest": {"loss": 1.0},
            "mean": {"loss": "nan"},
        },
    }
    etcd.etcdctl("put", f"/hotknob/{APP}/status/n1/c1", json.dumps(entry))
    done = run_cli(
        "set", "--app", APP, "--etcd-endpoints", etcd.endpoint,
        "train.lr=0.5", "--guard", "loss < 2 * baseline", "--window", "10",
    )  # fmt: skip
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.strip() == (
        "hotknob: the mean of loss over the last 32 reports of n1/c1 is not finite (a NaN or "
        "an infinity among them): the guard's baseline is taken from reports before the "
        "change (wait until the last reports hold none), or write the guard without "
        "'baseline'"
    ), done.stderr
    assert kv(etcd, P + "train/lr") == (None, 0)
    assert guard_records(etcd) == []


def test_baselines_tell_a_metric_nobody_reports_from_one_whose_means_are_not_finite() -> None:
    entries = {
        "n1/c1": {"metrics": {"mean": {"loss": "nan", "acc": 0.5}}},
        "n1/c2": {"metrics": {"mean": {"loss": "inf"}}},
        "n2/c3": {"metrics": {"mean": {"acc": 0.7}}},
    }
    with pytest.raises(InvalidInput) as raised:
        baselines_from(entries, "t", frozenset({"loss", "grad_norm", "acc"}))
    assert str(raised.value) == (
        "no process of app 't' reports grad_norm yet; the mean of loss over the last 32 "
        "reports of n1/c1, n1/c2 is not finite (a NaN or an infinity among them): the guard's "
        "baseline is taken from reports before the change (call live.report in the run, or "
        "wait until the last reports hold none), or write the guard without 'baseline'"
    )
    assert baselines_from(entries, "t", frozenset({"acc"})) == {
        "n1/c1": {"acc": 0.5},
        "n2/c3": {"acc": 0.7},
    }
