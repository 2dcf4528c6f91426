"""One daemon per state file on a state dir it cannot write (a read-only volume) where
the lock file was never created: the state file itself is locked, read-only.

The volume is a real tmpfs, remounted read-only (and back), so these need root and
``mount``; they skip, saying so, where a tmpfs cannot be mounted. Real daemons in child
processes (``DaemonProcess``), no etcd.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotknob.daemon.state import StateInUse, StateStore
from hotknob.daemon.state_format import SavedState
from tests.daemon_proc import DaemonProcess, RawClient, run_cli

pytestmark = pytest.mark.timeout(90)


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


class Volume:
    """A small tmpfs at ``path``, to be remounted read-only and back."""

    def __init__(self, path: Path):
        self.path = path

    def read_only(self) -> None:
        done = _mount("-o", "remount,ro", str(self.path))
        assert done.returncode == 0, done.stderr

    def writable(self) -> None:
        done = _mount("-o", "remount,rw", str(self.path))
        assert done.returncode == 0, done.stderr


@contextlib.contextmanager
def volume(path: Path) -> Iterator[Volume]:
    if os.geteuid() != 0:
        pytest.skip("needs root, to mount a tmpfs and remount it read-only")
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = _mount("-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path))
    except FileNotFoundError:
        pytest.skip("no mount command, to mount a tmpfs and remount it read-only")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield Volume(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def saved(version: int, ceiling: int) -> SavedState:
    return SavedState(
        version=version, revision=0, values={"train": {"lr": 0.1}}, version_ceiling=ceiling
    )


def config(path: Path, lr: float) -> Path:
    path.write_text(f"train:\n  lr: {lr}\n")
    return path


def test_a_second_daemon_on_a_read_only_state_dir_without_a_lock_file_exits_1(
    tmp_path: Path,
) -> None:
    """The state file is there, the lock file never was, and neither can be created: the
    first daemon locks the state file itself, and a second (another socket) is refused
    at once, as with a lock file, without touching the file."""
    cfg = config(tmp_path / "c.yaml", 0.1)
    first = DaemonProcess(tmp_path / "a", configs=[cfg])
    state_file = first.state_dir / "t.state.json"
    lock_file = first.state_dir / "t.state.lock"
    with volume(first.state_dir) as vol:
        StateStore(first.state_dir, "t").save(saved(7, ceiling=1006))
        assert not lock_file.exists()
        vol.read_only()
        before = state_file.read_bytes()
        try:
            with first:
                assert not first.events("state_lock_unavailable"), first.log()
                socket_b = tmp_path / "b" / "sock" / "t.sock"
                started = time.monotonic()
                done = run_cli(
                    "run", "--app", "t", "--socket", str(socket_b),
                    "--state-dir", str(first.state_dir), "--config", str(cfg),
                )  # fmt: skip
                assert done.returncode == 1, done.stderr
                assert time.monotonic() - started < 15
                line = done.stderr.strip().splitlines()[-1]
                assert line.startswith(f"hotknob: {state_file} is in use"), done.stderr
                assert "config_loaded" not in done.stderr and "Traceback" not in done.stderr
                assert not socket_b.exists()
                with RawClient(first.socket_path) as client:  # the first serves on
                    assert client.snapshot["version"] == 1007  # above the ceiling read
            # The lock goes with the daemon: the next one starts.
            second = DaemonProcess(tmp_path / "c", configs=[cfg])
            second.args[second.args.index("--state-dir") + 1] = str(first.state_dir)
            with second:
                assert not second.events("state_lock_unavailable"), second.log()
            assert state_file.read_bytes() == before
            assert not lock_file.exists()
        finally:
            first.kill()


def test_the_state_file_s_lock_outlives_the_holder_s_own_writes(tmp_path: Path) -> None:
    """The volume comes back writable under a daemon that holds the state file itself:
    its save writes a new file and renames it over the one locked, and the new file must
    be held as well, or a daemon that now creates the lock file would come in beside it."""
    state_dir = tmp_path / "state"
    with volume(state_dir) as vol:
        StateStore(state_dir, "x").save(saved(3, ceiling=1002))
        vol.read_only()
        holder = StateStore(state_dir, "x")
        try:
            assert holder.lock("pid 1, socket /a.sock") is None
            with pytest.raises(StateInUse, match=r"x\.state\.json is in use"):
                StateStore(state_dir, "x").lock("pid 2")
            vol.writable()
            inode = (state_dir / "x.state.json").stat().st_ino
            assert holder.save(saved(4, ceiling=2003))
            assert (state_dir / "x.state.json").stat().st_ino != inode  # a new file
            other = StateStore(state_dir, "x")
            with pytest.raises(StateInUse, match=r"x\.state\.json is in use"):
                other.lock("pid 2")  # creates the lock file, finds the state file held
            assert (state_dir / "x.state.lock").exists()
            # Once the holder is gone, the lock file is the lock again, as usual.
            holder.unlock()
            assert other.lock("pid 2, socket /b.sock") is None
            with pytest.raises(StateInUse, match=r"x\.state\.lock: pid 2, socket /b\.sock"):
                StateStore(state_dir, "x").lock("pid 3")
            other.unlock()
        finally:
            holder.unlock()


def test_a_read_only_state_dir_with_neither_file_still_serves_unlocked(
    tmp_path: Path,
) -> None:
    """Nothing to lock on: the daemon says so and serves, as documented."""
    cfg = config(tmp_path / "c.yaml", 0.1)
    daemon = DaemonProcess(tmp_path / "a", configs=[cfg])
    with volume(daemon.state_dir) as vol:
        vol.read_only()
        try:
            with daemon:
                (event,) = daemon.events("state_lock_unavailable")
                assert event["path"] == str(daemon.state_dir / "t.state.lock")
                assert "t.state.json" in event["error"], event
                with RawClient(daemon.socket_path) as client:
                    assert client.snapshot["version"] == 1
        finally:
            daemon.kill()
        assert os.listdir(daemon.state_dir) == []
