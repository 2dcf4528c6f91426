"""A guarded ``set`` deletes the records of old ended guards: the newest ``--keep-ended``
(default 100) stay, and so does every armed, malformed or other app's record. Real etcd,
and a real daemon watching the records while they go."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import pytest

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.guard_records import KEEP_ENDED, prune_ended
from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import APP, G, kv, read_prefix, wait_for

pytestmark = pytest.mark.timeout(120)

# Not the key the guarded sets below write: a guard whose key is written again stands down
# (``superseded``), and its record, ended and old, would be pruned by whoever came next.
KEYS = {"train.momentum": {"old": 0.9, "existed": True, "new": 0.8}}


def _record(guard_id: str, state: str) -> str:
    record = {"id": guard_id, "guard": "loss < 3", "window": 10, "patience": 3, "keys": KEYS}
    record["state"] = state
    if state != "armed":
        record["outcome"] = {"reason": "held for 10 steps"}
    return json.dumps(record)


def _ended_id(i: int) -> str:
    """Ids as ``new_guard_id`` makes them, in creation order, in 2020 (before any new one)."""
    return f"20200101T{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}-{i:06x}"


def _put_ended(etcd: EtcdServer, count: int, app: str = APP) -> list[str]:
    with closing(EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)))) as store:
        ids = [_ended_id(i) for i in range(count)]
        for guard_id in ids:
            store.put(f"/hotknob/{app}/guards/{guard_id}", _record(guard_id, "passed"))
        return ids


def _guarded_set(etcd: EtcdServer, value: str, *extra: str) -> str:
    done = run_cli(
        "set", "--app", APP, "--etcd-endpoints", etcd.endpoint, f"train.lr={value}",
        "--guard", "loss < 3", "--window", "100", "--json", *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["guard"])


def test_a_guarded_set_keeps_the_newest_ended_and_every_other_record(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    ended = _put_ended(etcd, 5)
    # An armed guard as a guarded set leaves it: its keys hold what it set, written with it
    # (a key not there would be one deleted since: the guard would stand down at once).
    etcd.etcdctl("put", f"/hotknob/{APP}/config/train/momentum", "0.8")
    etcd.etcdctl("put", G + "2019-armed", _record("2019-armed", "armed"))  # older than all
    etcd.etcdctl("put", G + "2019-junk", "not a record")
    other_app = _put_ended(etcd, 3, app="other")
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint) as daemon:
        wait_for("the armed record armed", lambda: daemon.events("guard_armed"))
        new = _guarded_set(etcd, "0.5", "--keep-ended", "2")
        left = set(read_prefix_raw(etcd, G))
        assert left == {G + i for i in [*ended[-2:], "2019-armed", "2019-junk", new]}
        # The daemon watching the prefix took the deletes of ended records in silence: it
        # watched none of them. The two armed guards stay armed.
        wait_for("the new guard armed", lambda: len(daemon.events("guard_armed")) == 2)
        assert not daemon.events("guard_removed", "guard_record_failed", "event_failed")
    assert len(read_prefix_raw(etcd, "/hotknob/other/guards/")) == len(other_app)
    assert kv(etcd, f"/hotknob/{APP}/config/train/lr")[0] == "0.5"


def read_prefix_raw(etcd: EtcdServer, prefix: str) -> dict[str, str]:
    """Keys and texts under ``prefix``: ``read_prefix`` parses JSON, and a junk record is none."""
    with closing(EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)))) as store:
        kvs, _ = store.read_prefix(prefix)
    return {k: v.decode() for k, v in kvs.items()}


def test_by_default_the_newest_hundred_ended_stay_and_many_go_in_batches(
    etcd: EtcdServer,
) -> None:
    ended = _put_ended(etcd, KEEP_ENDED + 30)
    first = _guarded_set(etcd, "0.5")  # no daemon: it stays armed
    records = read_prefix(etcd, G)
    assert set(records) == {G + i for i in [*ended[-KEEP_ENDED:], first]}
    # Over etcd's limit of operations in one transaction (128): deleted in several.
    second = _guarded_set(etcd, "0.25", "--keep-ended", "0")
    assert set(read_prefix(etcd, G)) == {G + first, G + second}


def test_prune_ended_counts_what_it_deleted_and_a_second_run_deletes_nothing(
    etcd: EtcdServer,
) -> None:
    ended = _put_ended(etcd, 3)
    with closing(EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)))) as store:
        assert prune_ended(store, APP, keep=3) == 0
        assert prune_ended(store, APP, keep=1) == 2
        assert prune_ended(store, APP, keep=1) == 0
    assert set(read_prefix(etcd, G)) == {G + ended[-1]}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--guard", "loss < 3", "--window", "10", "--keep-ended", "-1"], "--keep-ended must be"),
        (["--keep-ended", "5"], "need --guard"),
        (["--guard", "loss < 3", "--window", "10", "--keep-ended", "many"], "invalid int value"),
    ],
)
def test_a_bad_keep_ended_is_a_usage_error_before_anything_is_written(
    etcd: EtcdServer, args: list[str], fragment: str
) -> None:
    ended = _put_ended(etcd, 2)
    done = run_cli("set", "--app", APP, "--etcd-endpoints", etcd.endpoint, "train.lr=3e-4", *args)
    assert done.returncode == 2, done.stderr
    assert fragment in done.stderr
    assert set(read_prefix(etcd, G)) == {G + i for i in ended}
    assert kv(etcd, f"/hotknob/{APP}/config/train/lr") == (None, 0)


def test_the_guard_a_set_just_wrote_is_spared_though_it_ended_already(etcd: EtcdServer) -> None:
    """A revert on a NaN can end the new guard within the milliseconds between the commit
    and the prune's read; ``--wait`` then reads its verdict from that record."""
    ended = _put_ended(etcd, 3)
    with closing(EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)))) as store:
        assert prune_ended(store, APP, keep=0, spare=(ended[0],)) == 2
    assert set(read_prefix(etcd, G)) == {G + ended[0]}
