"""The state dir: one daemon per state file, an unreadable file set aside, a
durable ceiling, and a start a stop cuts short writing nothing.

Real daemons in child processes (``DaemonProcess``) and real files; the store's
folder fsyncs are observed by wrapping ``os.fsync`` and ``os.replace``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hotknob.daemon import state as state_module
from hotknob.daemon.state import StateStore
from hotknob.daemon.state_format import SavedState
from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli
from tests.etcd_server import free_port

pytestmark = pytest.mark.timeout(90)


def config(path: Path, lr: float) -> Path:
    path.write_text(f"train:\n  lr: {lr}\n")
    return path


def saved(version: int, ceiling: int = 0, clean: bool = False) -> SavedState:
    return SavedState(
        version=version,
        revision=0,
        values={"train": {"lr": 0.1}},
        version_ceiling=ceiling,
        clean=clean,
    )


def wait_for(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


# --- one daemon per state file ---------------------------------------------------------------


def test_a_second_daemon_on_the_same_state_file_is_refused_in_one_line(tmp_path: Path) -> None:
    """Two jobs of one app (two sockets, one state dir): the second would write its own
    ceiling over the first's, and a restart would serve versions below those seen."""
    cfg = config(tmp_path / "c.yaml", 0.1)
    first = DaemonProcess(tmp_path / "a", app="default", configs=[cfg])
    with first:
        config(cfg, 0.2)
        state_file = first.state_dir / "default.state.json"
        wait_for(lambda: json.loads(state_file.read_text())["version"] == 2)
        time.sleep(0.2)
        before = state_file.read_bytes()
        socket_b = tmp_path / "b" / "sock" / "default.sock"
        done = run_cli(
            "run", "--app", "default", "--socket", str(socket_b),
            "--state-dir", str(first.state_dir), "--config", str(cfg),
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        line = done.stderr.strip().splitlines()[-1]  # the one error line
        lock = first.state_dir / "default.state.lock"
        assert line.startswith(f"hotknob: {state_file} is in use"), done.stderr
        assert str(lock) in line
        assert f"pid {first.proc.pid}" in line and str(first.socket_path) in line
        # It stopped before reading anything.
        assert "config_loaded" not in done.stderr and "Traceback" not in done.stderr
        assert state_file.read_bytes() == before
        assert not socket_b.exists()
    # Once the first has stopped, the lock is free.
    extra = ["--state-dir", str(first.state_dir)]
    again = DaemonProcess(tmp_path / "b", app="default", configs=[cfg], extra=extra)
    with again, RawClient(again.socket_path) as client:
        assert client.snapshot["version"] == 2  # clean stop, same values


def test_a_second_daemon_on_the_same_socket_leaves_the_state_file_alone(tmp_path: Path) -> None:
    cfg = config(tmp_path / "c.yaml", 0.1)
    with DaemonProcess(tmp_path, configs=[cfg]) as first:
        for lr in (0.2, 0.3):
            config(cfg, lr)
            time.sleep(0.4)
        state_file = first.state_dir / "t.state.json"
        wait_for(lambda: json.loads(state_file.read_text())["version"] == 3)
        before = state_file.read_bytes()
        done = run_cli(*first.args, "--set", "train.lr=0.7")
        assert state_file.read_bytes() == before  # not rewritten, not marked clean
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"hotknob: {first.socket_path} is in use "
            f"(another daemon holds {first.socket_path}.lock)"
        )
        assert "config_loaded" not in done.stderr and "Traceback" not in done.stderr
        with RawClient(first.socket_path) as client:
            assert client.snapshot["version"] == 3


def test_the_state_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    one, two = StateStore(tmp_path / "s", "x"), StateStore(tmp_path / "s", "x")
    assert one.lock("pid 1, socket /a.sock") is None
    with pytest.raises(state_module.StateInUse, match=r"x\.state\.lock: pid 1, socket /a\.sock"):
        two.lock("pid 2, socket /b.sock")
    one.unlock()
    assert two.lock("pid 2") is None
    two.unlock()


def test_a_lock_file_on_a_read_only_volume_is_still_locked_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state dir on a volume mounted read-only (the lock file there from before): the
    read-write open fails with EROFS, not a permission error; the lock is still taken
    read-only, and a second daemon on the dir is refused, not let in unlocked."""
    one, two = StateStore(tmp_path / "s", "x"), StateStore(tmp_path / "s", "x")
    assert one.lock("pid 1") is None  # the lock file exists, as on the volume before
    one.unlock()
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(state_module.os, "open", read_only)
    assert one.lock("pid 1") is None
    with pytest.raises(state_module.StateInUse):
        two.lock("pid 2")
    one.unlock()


def test_a_state_dir_that_cannot_hold_a_lock_is_no_reason_not_to_serve(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = StateStore(blocker / "state", "x")
    problem = store.lock("pid 1")
    assert problem is not None and "state.lock" in problem


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as another user")
def test_another_user_s_daemon_on_a_shared_state_dir_is_refused_too(tmp_path: Path) -> None:
    """Another user cannot write the lock file: it must still take the lock (read-only) and
    be refused, not go on unlocked and lower the ceiling the holder wrote."""
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="hotknob-shared-"))
    try:
        shared.chmod(0o777)
        holder = StateStore(shared, "x")
        assert holder.lock("pid 1, socket /a.sock") is None
        holder.save(saved(5, ceiling=6000))
        read_r, read_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the other user
            code = 1
            try:
                os.close(read_r)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    StateStore(shared, "x").lock("pid 2")
                    os.write(read_w, b"locked")
                except state_module.StateInUse as exc:
                    os.write(read_w, f"refused: {exc}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(read_w)
        with os.fdopen(read_r, "rb") as f:
            said = f.read().decode()
        os.waitpid(pid, 0)
        assert said.startswith("refused: ") and "pid 1, socket /a.sock" in said, said
        holder.unlock()
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)


def test_a_folder_that_cannot_be_synced_does_not_fail_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some file systems refuse fsync on a folder (EINVAL): the rename is done, the save
    and its ceiling stand (else every change went through a synchronous save)."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(state_module.os, "fsync", fsync)
    store = StateStore(tmp_path, "x")
    assert store.save(saved(1, ceiling=1001))
    assert store.ceiling == 1001


# --- an unreadable state file ----------------------------------------------------------------


def good_file(tmp_path: Path) -> Path:
    store = StateStore(tmp_path, "x")
    store.save(saved(7, ceiling=1006, clean=True))
    return store.path


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda text: text[:40], "not JSON"),
        (lambda text: "", "empty"),
        (lambda text: json.dumps({**json.loads(text), "format": 2}), "format 2"),
        (lambda text: json.dumps({**json.loads(text), "version": "x"}), "version is 'x'"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "values"}),
         "no 'values' field"),
        (lambda text: "[1, 2]", "a JSON list"),
    ],
)  # fmt: skip
def test_an_unreadable_state_file_is_moved_aside_not_lost(
    tmp_path: Path, damage: object, reason: str
) -> None:
    path = good_file(tmp_path)
    path.write_text(damage(path.read_text()))  # type: ignore[operator]
    damaged = path.read_bytes()
    store = StateStore(tmp_path, "x")
    assert store.load() is None
    aside = store.set_aside
    assert aside is not None and reason in aside.reason, aside
    assert aside.moved_to is not None and aside.moved_to.name.startswith("x.state.json.unreadable-")
    assert aside.moved_to.read_bytes() == damaged
    assert not path.exists()
    store.save(saved(1, ceiling=1001))  # the new file does not touch the one set aside
    assert aside.moved_to.read_bytes() == damaged
    # A second one in the same second gets a name of its own.
    path.write_text("{")
    again = StateStore(tmp_path, "x")
    assert again.load() is None and again.set_aside is not None
    assert again.set_aside.moved_to not in (None, aside.moved_to)


def test_no_state_file_is_no_problem(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "none", "x")
    assert store.load() is None and store.set_aside is None
    assert StateStore(tmp_path, "x").load() is None
    under_a_file = tmp_path / "f"
    under_a_file.write_text("")
    store = StateStore(under_a_file, "x")
    assert store.load() is None and store.set_aside is None


def test_a_readable_state_file_is_read_as_before(tmp_path: Path) -> None:
    path = good_file(tmp_path)
    store = StateStore(tmp_path, "x")
    loaded = store.load()
    assert loaded is not None and store.set_aside is None
    assert (loaded.version, loaded.version_ceiling, loaded.clean) == (7, 1006, True)
    # A file from before versions were reserved counts as clean at its version.
    data = json.loads(path.read_text())
    del data["version_ceiling"], data["clean"]
    path.write_text(json.dumps(data))
    old = StateStore(tmp_path, "x").load()
    assert old is not None and (old.version, old.version_ceiling, old.clean) == (7, 7, True)


def test_a_daemon_on_a_corrupt_state_file_says_so_and_keeps_the_file(tmp_path: Path) -> None:
    cfg = config(tmp_path / "c.yaml", 0.1)
    daemon = DaemonProcess(tmp_path, configs=[cfg])
    with daemon:
        for lr in (0.2, 0.3):
            config(cfg, lr)
            time.sleep(0.4)
    state_file = daemon.state_dir / "t.state.json"
    state_file.write_text(state_file.read_text()[:40])
    with daemon:
        with RawClient(daemon.socket_path) as client:
            assert client.snapshot["version"] == 1  # as with no file: it must come up
        (event,) = daemon.events("state_file_unreadable")
        assert event["level"] == "error" and event["path"] == str(state_file)
        assert "truncated or corrupt" in event["reason"]
        moved = Path(event["moved_to"])
        assert moved.parent == daemon.state_dir and len(moved.read_text()) == 40
    assert json.loads(state_file.read_text())["version"] == 1


# --- a stop during the start -----------------------------------------------------------------


def test_sigterm_while_the_start_waits_for_etcd_ends_the_start(tmp_path: Path) -> None:
    """Not after ``--etcd-start-timeout``, and without serving: no socket opened, the
    state file not written."""
    sock = tmp_path / "s" / "t.sock"
    state_dir = tmp_path / "st"
    log_path = tmp_path / "d.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            hotknob_cmd(
                "run", "--app", "t", "--socket", str(sock), "--state-dir", str(state_dir),
                "--etcd-endpoints", f"127.0.0.1:{free_port()}", "--etcd-start-timeout", "30",
            ),
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "HOTKNOB_ETCD_ENDPOINTS"},
        )  # fmt: skip
    try:
        # The watcher has tried etcd once: the start waits for it now.
        wait_for(lambda: "etcd_disconnected" in log_path.read_text() or proc.poll() is not None)
        time.sleep(0.3)
        assert proc.poll() is None, log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=8) == 0, log_path.read_text()
        text = log_path.read_text()
        assert "start_abandoned" in text and "daemon_stopped" in text
        assert "socket_listening" not in text and "daemon_ready" not in text
        assert not sock.exists() and not (state_dir / "t.state.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the folder is fsynced when it matters ---------------------------------------------------


def test_a_new_ceiling_is_made_durable_a_per_change_save_is_not_slowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(state_module.os, "fsync", fsync)
    monkeypatch.setattr(state_module.os, "replace", replace)
    store = StateStore(tmp_path, "x")
    store.save(saved(1, ceiling=1001))  # the start's reservation
    assert events == ["fsync file", "rename", "fsync folder"]
    events.clear()
    store.save(saved(2, ceiling=1001))  # a change within the block
    assert events == ["fsync file", "rename"]
    events.clear()
    store.save(saved(1002, ceiling=2002))  # the next block
    assert events == ["fsync file", "rename", "fsync folder"]
    events.clear()
    store.save(saved(1003, ceiling=2002, clean=True))  # the clean stop
    assert events == ["fsync file", "rename", "fsync folder"]
