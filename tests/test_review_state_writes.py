"""Saving the state while it cannot be saved: a state dir that a file stands in place of,
a stream of etcd changes, a save that raises what no disk does.

A real ``hotknob run`` with a real etcd for the stream; the keeper and the writer on real
files in a temporary state dir, with a store whose save raises where no real input is
known to make one.
"""

from __future__ import annotations

import errno
import json
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.logs import get_logger
from hotknob.daemon.published import Published
from hotknob.daemon.state import VERSION_BLOCK, StateStore
from hotknob.daemon.state_format import SavedState
from hotknob.daemon.state_keeper import StateKeeper
from hotknob.daemon.state_writer import StateWriter
from hotknob.daemon.throttle import Repeats
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer, free_port
from tests.test_metrics_health import wait_for

pytestmark = pytest.mark.timeout(60)

P = "/hotknob/t/config/"


def healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        return json.loads(response.read())


def published(version: int) -> Published:
    values = {"train": {"lr": version / 1000}}
    return Published(version, version, values, {}, {"train.lr": version / 1000})


def pushed_to(into: list[int]) -> Any:
    return lambda state: into.append(state.version)


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


class BreakableStore(StateStore):
    """A real store whose save raises ``fault`` while it is set (no disk raises it), after
    ``delay`` seconds (a disk that fails slowly: EIO after its retries, a hung mount)."""

    def __init__(self, state_dir: Path, app: str) -> None:
        super().__init__(state_dir, app)
        self.fault: Exception | None = None
        self.delay = 0.0
        self.tries = 0

    def save(self, state: SavedState) -> bool:
        self.tries += 1
        if self.fault is not None:
            time.sleep(self.delay)
            raise self.fault
        return super().save(state)


# --- a stream of changes on a state dir that cannot be written --------------------------------


def test_a_stream_of_changes_on_an_unwritable_state_dir_logs_the_failure_once(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    port = free_port()
    daemon = DaemonProcess(
        tmp_path, endpoints=etcd.endpoint, extra=["--metrics-addr", f"127.0.0.1:{port}"]
    )
    daemon.state_dir.write_text("not a folder")  # ENOTDIR for every save, even as root
    store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
    try:
        with daemon, RawClient(daemon.socket_path) as client:
            changes = 300
            for n in range(1, changes + 1):
                store.put(P + "train/warmup_steps", str(n))
            while client.next_update()["values"]["train"]["warmup_steps"] != changes:
                pass  # every change was pushed all the same
            assert "Not a directory" in healthz(port)["state_write_error"]
            (failed,) = daemon.events("state_write_failed")  # not one per change
            assert "Not a directory" in failed["error"]
            assert failed["failures"] == 1
            # The start's reservation failed: its version may be published again.
            assert failed["versions"].startswith("1 and later are not reserved on disk")
            # Saving works again: said once, with how many tries failed meanwhile.
            daemon.state_dir.unlink()
            store.put(P + "train/warmup_steps", "0")
            assert client.next_update()["values"]["train"]["warmup_steps"] == 0
            (recovered,) = wait_for(
                lambda: daemon.events("state_write_recovered"), "state_write_recovered"
            )
            assert recovered["failures"] > 1
            assert recovered["not_logged"] == recovered["failures"] - 1
            assert healthz(port)["state_write_error"] is None
        assert len(daemon.events("state_write_failed")) == 1
        saved = json.loads((daemon.state_dir / "t.state.json").read_text())
        assert saved["clean"] is True and saved["values"]["train"]["warmup_steps"] == 0
    finally:
        store.close()


def test_each_new_reason_is_logged_and_a_failed_reservation_says_versions_may_repeat(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    store = StateStore(state_dir, "t")
    keeper = StateKeeper(store, get_logger("hotknob.test"))
    pushed: list[int] = []
    with capture_logs() as logs:
        keeper.publish(published(1), {}, pushed_to(pushed))  # reserves up to 1 + the block
        aside = tmp_path / "aside"
        state_dir.rename(aside)
        state_dir.write_text("not a folder")
        for version in range(2, 12):  # within the ceiling: the writer's saves fail
            keeper.publish(published(version), {}, pushed_to(pushed))
            assert keeper.flush(timeout=5)
        (snapshots,) = events(logs, "state_write_failed")
        assert "versions" not in snapshots  # reserved: a restart begins above them
        # Above the ceiling: the same reason, but versions are at stake now.
        above = VERSION_BLOCK + 2
        for version in range(above, above + 10):  # the first tries, then the writer
            keeper.publish(published(version), {}, pushed_to(pushed))
            assert keeper.flush(timeout=5)
        _, reserving = events(logs, "state_write_failed")
        assert reserving["versions"].startswith(f"{above} and later are not reserved")
        assert reserving["failures"] == 11 and reserving["not_logged"] == 9
        # Another reason: a folder where the state file should be.
        state_dir.unlink()
        aside.rename(state_dir)
        (state_dir / "t.state.json").unlink()
        (state_dir / "t.state.json").mkdir()
        for version in (above + 10, above + 11):
            keeper.publish(published(version), {}, pushed_to(pushed))
            assert keeper.flush(timeout=5)
        failed = events(logs, "state_write_failed")
        assert len(failed) == 3 and "Is a directory" in failed[2]["error"]
        assert keeper.error is not None and "Is a directory" in keeper.error
        (state_dir / "t.state.json").rmdir()
        keeper.publish(published(above + 12), {}, pushed_to(pushed))
        assert keeper.flush(timeout=5)
    assert keeper.error is None
    (recovered,) = events(logs, "state_write_recovered")
    assert recovered["failures"] == 22 and recovered["not_logged"] == 1
    assert pushed == [1, *range(2, 12), *range(above, above + 13)]  # each pushed
    keeper.close(published(above + 12), {})
    loaded = store.load()
    assert loaded is not None and loaded.version == above + 12 and loaded.clean


def test_repeats_says_a_failure_when_it_starts_changes_or_its_time_is_up() -> None:
    quiet = Repeats(every=3600.0)
    assert quiet.succeeded() is None  # nothing was failing
    assert quiet.failed("a") == {"failures": 1, "not_logged": 0}
    assert quiet.failed("a") is None and quiet.failed("a") is None
    assert quiet.failed("b") == {"failures": 4, "not_logged": 2}
    assert quiet.failed("b") is None
    assert quiet.failed("b", say=True) == {"failures": 6, "not_logged": 1}
    assert quiet.failed("b") is None
    assert quiet.succeeded() == {"failures": 7, "not_logged": 1}
    assert quiet.failed("b") == {"failures": 1, "not_logged": 0}  # a new failure
    every_time = Repeats(every=0.0)
    assert every_time.failed("a") == {"failures": 1, "not_logged": 0}
    assert every_time.failed("a") == {"failures": 2, "not_logged": 0}


# --- a save that raises what no disk does --------------------------------------------------------


def test_the_writer_survives_a_save_that_raises_anything_and_saves_later_states(
    tmp_path: Path,
) -> None:
    store = BreakableStore(tmp_path, "w")
    results: list[Exception | None] = []
    writer = StateWriter(store, results.append, linger_s=2.0, interval_s=0.01, settle_s=0.0)
    try:
        store.fault = RuntimeError("a bug in the save")
        writer.submit(SavedState(version=1, revision=1, values={"a": 1}))
        assert writer.flush(timeout=2)  # not left waiting on a writer that is gone
        assert len(results) == 1 and isinstance(results[0], RuntimeError)
        store.fault = None
        writer.submit(SavedState(version=2, revision=2, values={"a": 2}))
        assert writer.flush(timeout=2)
        assert results[1:] == [None]
        loaded = store.load()
        assert loaded is not None and loaded.version == 2
    finally:
        writer.close(timeout=2)
    assert not [t for t in threading.enumerate() if t.name == "hotknob-state-writer"]


def test_a_reservation_or_save_that_raises_anything_is_reported_and_the_change_pushed(
    tmp_path: Path,
) -> None:
    store = BreakableStore(tmp_path, "t")
    keeper = StateKeeper(store, get_logger("hotknob.test"))
    pushed: list[int] = []
    with capture_logs() as logs:
        store.fault = ValueError("Out of range float values are not JSON compliant")
        keeper.publish(published(1), {}, pushed_to(pushed))  # the reservation raises
        assert pushed == [1]
        assert keeper.error == (
            f"{store.path}: not saved: ValueError: Out of range float values are not JSON compliant"
        )
        store.fault = None
        keeper.publish(published(2), {}, pushed_to(pushed))  # reserves up to 2 + the block
        assert keeper.flush(timeout=2) and store.ceiling == 2 + VERSION_BLOCK
        store.fault = TypeError("Object of type date is not JSON serializable")
        keeper.publish(published(3), {}, pushed_to(pushed))  # the writer's save raises
        assert keeper.flush(timeout=2)
        assert keeper.error is not None and "not saved: TypeError" in keeper.error
        store.fault = None
        keeper.publish(published(4), {}, pushed_to(pushed))
        assert keeper.flush(timeout=2)
        assert keeper.error is None
    assert pushed == [1, 2, 3, 4]
    failed = events(logs, "state_write_failed")
    assert [e["error"].split(": not saved: ")[1].split(":")[0] for e in failed] == [
        "ValueError",
        "TypeError",
    ]
    assert len(events(logs, "state_write_recovered")) == 2
    keeper.close(published(4), {})
    loaded = store.load()
    assert loaded is not None and loaded.version == 4 and loaded.clean


# --- a disk that fails slowly --------------------------------------------------------------------


def test_once_a_reservation_failed_no_change_waits_for_the_disk_again(tmp_path: Path) -> None:
    store = BreakableStore(tmp_path, "t")
    keeper = StateKeeper(store, get_logger("hotknob.test"))
    pushed: list[int] = []
    store.fault, store.delay = OSError(errno.EIO, "Input/output error"), 0.3
    with capture_logs() as logs:
        keeper.publish(published(1), {}, pushed_to(pushed))  # tries first, as always
        assert pushed == [1] and store.tries == 1
        for version in range(2, 12):
            started = time.monotonic()
            keeper.publish(published(version), {}, pushed_to(pushed))
            assert time.monotonic() - started < 0.1  # pushed, not held by a try
        assert pushed == list(range(1, 12))
        assert keeper.flush(timeout=5)
        assert store.tries < 11  # the writer's tries, coalesced
        (failed,) = events(logs, "state_write_failed")
        assert failed["versions"].startswith("1 and later are not reserved")
        assert keeper.error == f"{store.path}: Input/output error"
        store.fault = None  # the disk is back: the writer's next try reserves
        keeper.publish(published(12), {}, pushed_to(pushed))
        assert keeper.flush(timeout=5)
    assert keeper.error is None
    assert len(events(logs, "state_write_recovered")) == 1
    loaded = store.load()
    assert loaded is not None and loaded.version == 12
    assert loaded.version_ceiling == 12 + VERSION_BLOCK
    keeper.publish(published(13), {}, pushed_to(pushed))  # within it now: the writer's
    keeper.close(published(13), {})
    loaded = store.load()
    assert loaded is not None and loaded.version == 13 and loaded.clean
