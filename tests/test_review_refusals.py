"""The refusals a daemon cleared (``rejected_before`` in its processes' status entries),
against real etcd and real daemons: a burst that takes a refused key and refuses it again,
a refusal that comes right after a full read took the key, etcd restored from a backup
below a cleared refusal, and a burst that refuses two keys and takes both back. In each,
``set --wait`` (``wait_applied``, as the CLI calls it) of a revision the stricter node
applied must say applied, as it says rejected of one it refused.

n1 runs the built-in schema; n2 the stricter ``tests.test_rollout:Strict`` (``temperature
<= 1.2``), through a relay that can cut it off from etcd.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.status_entries import status_entries
from hotknob.daemon.wait_applied import WatchedEntries, wait_applied
from tests.daemon_proc import DaemonProcess, hotknob_cmd
from tests.etcd_server import EtcdServer
from tests.test_etcd_recovery import Relay
from tests.test_faults import _etcdutl
from tests.test_rollout import APP, Acking

pytestmark = pytest.mark.timeout(120)

CONFIG = f"/hotknob/{APP}/config/"
TEMPERATURE = CONFIG + "sampling/temperature"
KEYS = ["sampling.temperature"]


class Nodes:
    """n1 straight on etcd, n2 (stricter) through ``relay``; one acking process on each."""

    def __init__(self, etcd: EtcdServer, store: EtcdStore, relay: Relay, n2: DaemonProcess):
        self.etcd = etcd
        self.store = store
        self.relay = relay
        self.n2 = n2

    def entries(self) -> dict[str, dict[str, Any]]:
        kvs, _ = self.store.read_prefix(f"/hotknob/{APP}/status/")
        return status_entries(APP, kvs)

    def until(self, what: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        """n2/p2's entry once ``what`` holds of it."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.entries().get("n2/p2", {})
            if what(entry):
                return entry
            assert time.monotonic() < deadline, entry
            time.sleep(0.02)

    def both_run(self, revision: int) -> None:
        deadline = time.monotonic() + 20
        while True:
            entries = self.entries()
            if len(entries) == 2 and all(
                e.get("revision", 0) >= revision for e in entries.values()
            ):
                return
            assert time.monotonic() < deadline, entries
            time.sleep(0.02)

    def refused(self, value: str) -> int:
        """Write a temperature n2 refuses, and wait until its entry says so."""
        revision = self.store.put(TEMPERATURE, value)
        self.until(lambda e: e.get("rejected", {}).get("revision") == revision)
        return revision

    def wait(self, revision: int) -> Any:
        """``set --wait``'s verdict on ``revision``, which wrote the temperature."""
        return wait_applied(WatchedEntries(self.store, APP), revision, 30, keys=KEYS)


@contextmanager
def two_nodes(etcd: EtcdServer, tmp_path: Path, *, n2_before_main: str = "") -> Iterator[Nodes]:
    with ExitStack() as stack:
        relay = Relay(etcd.client_port)
        stack.callback(relay.close)
        store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
        stack.callback(store.close)
        n1 = DaemonProcess(
            tmp_path / "n1", app=APP, endpoints=etcd.endpoint, extra=["--node", "n1"]
        )
        n2 = DaemonProcess(
            tmp_path / "n2",
            app=APP,
            endpoints=relay.endpoint,
            extra=["--node", "n2", "--schema", "tests.test_rollout:Strict"],
            before_main=n2_before_main,
        )
        stack.enter_context(n1)
        stack.enter_context(n2)
        stack.enter_context(Acking(n1, "p1"))
        stack.enter_context(Acking(n2, "p2"))
        nodes = Nodes(etcd, store, relay, n2)
        nodes.both_run(0)
        yield nodes


# The loop takes 50 ms to start each drain of the etcd feed (a busy loop): the changes of a
# catch-up after the first (which the watch thread takes alone) are then all queued when
# it drains them, and reach the engine as one group, whatever the threads' timing.
SLOW_DRAINS = """
import time
import hotknob.daemon.etcd_feed as feed
drain = feed.EtcdFeed._drain
def slow(self):
    time.sleep(0.05)
    drain(self)
feed.EtcdFeed._drain = slow
"""


def test_a_burst_that_takes_a_refused_key_and_refuses_it_again_starts_a_new_run(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """n2 refused 1.5; cut off, it misses 0.9 (which it takes) and 1.6 (which it refuses),
    and gets them back together, in one group: the engine reports a group's refusals
    before the daemon takes its revisions, so the run of refusals of 1.5 went on through
    1.6 as if 0.9 had been refused too. Once 0.5 clears it, ``set --wait`` of 0.9 must say
    n2 applied it (it ran 0.9), and of 1.6 that it rejected it. (Of 1.5 too while 1.6 is
    in force; once 1.6 is cleared, only its run is kept: one per key.)"""
    with two_nodes(etcd, tmp_path, n2_before_main=SLOW_DRAINS) as nodes:
        hot = nodes.refused("1.5")
        nodes.relay.cut()
        other = nodes.store.put(CONFIG + "train/lr", "0.05")  # the catch-up's lone change
        cool = nodes.store.put(TEMPERATURE, "0.9")
        hotter = nodes.store.put(TEMPERATURE, "1.6")
        nodes.relay.restore()
        nodes.until(lambda e: e.get("rejected", {}).get("revision") == hotter)
        accepted = {e["revision"] for e in nodes.n2.events("change_accepted")}
        assert {other, cool} <= accepted, nodes.n2.events("change_accepted")
        result = nodes.wait(hot)
        assert list(result.rejected) == ["n2/p2"], result
        cleared = nodes.store.put(TEMPERATURE, "0.5")
        nodes.both_run(cleared)
        entry = nodes.until(lambda e: "rejected" not in e and e.get("revision", 0) >= cleared)
        assert entry["rejected_before"]["sampling.temperature"]["since"] == hotter, entry
        result = nodes.wait(cool)
        assert result.ok and sorted(result.applied) == ["n1/p1", "n2/p2"], result
        result = nodes.wait(hotter)
        assert list(result.rejected) == ["n2/p2"], result


# A push holds lone changes back for this long after it (``PUSH_EVERY_S``), so that a
# change right after a full read reaches the engine through the loop, as one group: as a
# burst would, or a change within 2 ms of the read's push.
SLOW_PUSHES = "import hotknob.daemon.app as app; app.PUSH_EVERY_S = 3.0"


def test_a_refusal_right_after_a_full_read_that_took_the_key_starts_a_new_run(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """n2 refused 1.5; cut off, it misses 0.9, and etcd is compacted past it: n2 reads etcd
    in full and takes 0.9 there. A change that it refuses next (1.6), coming before any
    change it takes, went on with the run of 1.5 as if the read had refused 0.9 too. Once
    0.5 clears it, ``set --wait`` of 0.9 must say n2 applied it, and of 1.6 that it
    rejected it."""
    with two_nodes(etcd, tmp_path, n2_before_main=SLOW_PUSHES) as nodes:
        hot = nodes.refused("1.5")
        nodes.relay.cut()
        cool = nodes.store.put(TEMPERATURE, "0.9")
        nodes.etcd.etcdctl("compact", str(cool))
        nodes.relay.restore()
        deadline = time.monotonic() + 20
        while not any("/config/" in e["detail"] for e in nodes.n2.events("etcd_reconnected")):
            assert time.monotonic() < deadline, nodes.n2.log()
            time.sleep(0.005)
        assert nodes.n2.events("etcd_resync"), nodes.n2.log()
        hotter = nodes.store.put(TEMPERATURE, "1.6")
        nodes.until(lambda e: e.get("rejected", {}).get("revision") == hotter)
        accepted = {e["revision"] for e in nodes.n2.events("change_accepted")}
        assert max(accepted) >= cool, nodes.n2.log()  # the read took 0.9
        result = nodes.wait(hot)
        assert list(result.rejected) == ["n2/p2"], result
        cleared = nodes.store.put(TEMPERATURE, "0.5")
        nodes.both_run(cleared)
        entry = nodes.until(lambda e: "rejected" not in e and e.get("revision", 0) >= cleared)
        assert entry["rejected_before"]["sampling.temperature"]["since"] == hotter, entry
        result = nodes.wait(cool)
        assert result.ok and sorted(result.applied) == ["n1/p1", "n2/p2"], result
        result = nodes.wait(hotter)
        assert list(result.rejected) == ["n2/p2"], result


def test_etcd_restored_below_a_cleared_refusal_is_forgotten_before_a_wait_reads_it(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """n2 refused 1.5 and 1.6, ten revisions apart, then took 0.5. etcd is restored from a
    backup made just before: its revisions count on from there and will name other
    changes. n2's full read of the restored etcd changes its values, so its process
    applies them and its entry is written again: it must not carry the cleared refusals
    of the lost history, or ``set --wait`` of the first change written after the restore,
    whose revision falls among them, says n2 rejected a change it applied."""
    with two_nodes(etcd, tmp_path) as nodes:
        backup = tmp_path / "backup.db"
        etcd.etcdctl("snapshot", "save", str(backup))
        hot = nodes.refused("1.5")
        for step in range(10):
            nodes.store.put(CONFIG + "train/warmup_steps", str(step + 1))
        hotter = nodes.refused("1.6")
        cleared = nodes.store.put(TEMPERATURE, "0.5")
        nodes.both_run(cleared)
        entry = nodes.until(lambda e: "sampling.temperature" in e.get("rejected_before", {}))
        version = entry["version"]
        etcd.kill()
        shutil.rmtree(etcd.data_dir / "data")
        subprocess.run(
            [_etcdutl(), "snapshot", "restore", str(backup),
             "--data-dir", str(etcd.data_dir / "data"), "--name", etcd.name,
             "--initial-cluster", f"{etcd.name}={etcd.peer_url}",
             "--initial-advertise-peer-urls", etcd.peer_url],
            check=True, capture_output=True,
        )  # fmt: skip
        etcd.launch()
        etcd.wait_healthy()
        # n2's process applies what the read of the restored etcd says (warmup_steps 0).
        entry = nodes.until(lambda e: e.get("version", 0) > version, timeout=30)
        assert entry["revision"] < hotter and not entry.get("rejected_before"), entry
        # The first change after the restore, at a revision among those refused before.
        while (at := nodes.store.put("/elsewhere/x", "1")) < hot - 1:
            pass
        assert at < hotter
        written = nodes.store.put(TEMPERATURE, "0.7")
        assert hot <= written <= hotter
        result = nodes.wait(written)
        assert result.ok and sorted(result.applied) == ["n1/p1", "n2/p2"], result


def test_a_burst_that_refuses_two_keys_and_takes_both_back_leaves_nothing_in_force(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """One group on n2: temperature 1.7 (n2 refuses it), lr -1 (both refuse it), lr 0.2,
    temperature 0.3. The engine reports a group's refusals after its push: each must
    still come before the takes of the revisions after it, so that both keys end
    cleared, with one run each (``status`` shows no error), and ``set --wait`` says
    rejected of the refused revisions only."""
    with two_nodes(etcd, tmp_path, n2_before_main=SLOW_DRAINS) as nodes:
        nodes.relay.cut()
        steps = nodes.store.put(CONFIG + "train/warmup_steps", "3")  # the lone change
        hot = nodes.store.put(TEMPERATURE, "1.7")
        negative = nodes.store.put(CONFIG + "train/lr", "-1")
        lr = nodes.store.put(CONFIG + "train/lr", "0.2")
        cool = nodes.store.put(TEMPERATURE, "0.3")
        nodes.relay.restore()
        nodes.both_run(cool)
        entry = nodes.until(lambda e: len(e.get("rejected_before", {})) == 2)
        assert "rejected" not in entry, entry
        assert entry["rejected_before"]["sampling.temperature"]["since"] == hot, entry
        assert entry["rejected_before"]["train.lr"]["since"] == negative, entry
        assert entry["rejected_before"]["train.lr"]["revision"] == negative, entry
        rejected = {e["revision"] for e in nodes.n2.events("change_rejected")}
        assert rejected == {hot, negative}, nodes.n2.log()
        for revision, keys, refusing in (
            (steps, ["train.warmup_steps"], []),
            (hot, KEYS, ["n2/p2"]),
            (negative, ["train.lr"], ["n1/p1", "n2/p2"]),
            (lr, ["train.lr"], []),
            (cool, KEYS, []),
        ):
            result = wait_applied(WatchedEntries(nodes.store, APP), revision, 30, keys=keys)
            assert sorted(result.rejected) == refusing, (revision, result)
            assert result.done and not result.behind, (revision, result)
        status = subprocess.run(
            hotknob_cmd("status", "--app", APP, "--etcd-endpoints", etcd.endpoint),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0 and "rejected" not in status.stdout, status.stdout
