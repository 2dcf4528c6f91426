"""``set --guard ... --wait``: once every process applied the change, its guard's verdict.

A guarded change is settled when its guard ends it (``guard_records``: ``passed``,
``reverted``, ``blocked``, ``superseded`` or ``abandoned``), not when it lands: a script
that retunes in steps wants to know whether the step held before it takes the next. The
record is read once, then followed with a watch of its key until its state leaves
``armed``, or the time is up.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

from hotknob.config.errors import HotknobError

from .etcd_store import EtcdStore, WatchItem
from .guard_records import (
    ABANDONED,
    ARMED,
    BLOCKED,
    PASSED,
    REVERTED,
    SUPERSEDED,
    GuardRecord,
)


class GuardVerdict(HotknobError):
    """The guard did not pass the change (it reverted it, or could not judge it), or had
    not decided in time (exit 1)."""

    exit_code = 1


def wait_verdict(
    store: EtcdStore,
    path: str,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> GuardRecord | None:
    """The guard record at ``path`` once it leaves ``armed``, or as it is when ``timeout``
    seconds are up; None if it is gone (deleted around hotknob) or no longer a record."""
    start = clock()
    kvs, read_at = store.read_prefix(path)
    record = _record(kvs.get(path))
    if record is None or record.state != ARMED:
        return record
    changes: queue.SimpleQueue[WatchItem] = queue.SimpleQueue()
    store.watch_prefix(path, read_at + 1, changes.put)
    while True:
        left = timeout - (clock() - start)
        try:
            item = changes.get(timeout=left) if left > 0 else changes.get_nowait()
        except queue.Empty:
            return record
        if isinstance(item, HotknobError):
            raise item
        for change in item:
            if path in change.deletes:
                return None
            raw = change.puts.get(path)
            if raw is not None:
                record = _record(raw)
                if record is None or record.state != ARMED:
                    return record


def read_verdict(store: EtcdStore, path: str) -> GuardRecord | None:
    """The guard record at ``path`` as it is now, with no wait: for ``--json`` when the
    wait for the processes ended without the verdict waited for (every daemon rejected
    the change, or some process is behind); None if it is gone."""
    kvs, _ = store.read_prefix(path)
    return _record(kvs.get(path))


def verdict_text(
    guard_id: str, record: GuardRecord | None, timeout: float, *, by_all: bool = True
) -> str:
    """One line: what the guard decided (``passed`` is the only good one), or that it had
    not decided within ``timeout`` seconds. ``by_all`` False: not every process applied
    the change (the line follows why, and says nothing of it)."""
    if record is None:
        return f"guard {guard_id}: its record is gone from etcd, so no verdict will come"
    reason = (record.outcome or {}).get("reason", "")
    if record.state == ARMED:
        applied = "the change is applied, but " if by_all else ""
        return (
            f"{applied}guard {guard_id} has not decided within {timeout:g} s "
            f"(it watches {record.window} steps); `hotknob status` follows it"
        )
    text = f"guard {guard_id} {_ENDINGS.get(record.state, record.state)}"
    return f"{text}: {reason}" if reason else text


_ENDINGS = {
    PASSED: "passed the change",
    REVERTED: "reverted the change",
    BLOCKED: "failed the change, and could not revert it",
    SUPERSEDED: "ended unjudged (superseded)",
    ABANDONED: "ended unjudged (abandoned)",
}


def _record(raw: bytes | None) -> GuardRecord | None:
    if raw is None:
        return None
    try:
        return GuardRecord.from_json(raw)
    except ValueError:
        return None
