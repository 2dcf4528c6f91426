"""The watch of an app's guard records in etcd: which guards to arm, and which ended.

A daemon watches ``/hotknob/<app>/guards/`` on a thread of its own, like the config
watcher, and hears of each record on its event loop: an ``armed`` one not armed here yet
is armed, one that ended (or was deleted) is dropped. An armed record read in a snapshot
(at start, or after the watch lost its place) is armed at its mod revision, read first:
armed records are never rewritten, so that is the revision of the change it guards. A
record that does not parse, or whose id does not match its key, is logged and left out;
a surprise in one never stops the others.

What arming and dropping do is the guard manager's (``guards.py``); this is only the
reading of the records, and why it is apart: it knows nothing of processes or reports.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from typing import Any

from .etcd_store import EtcdChange, EtcdOptions
from .etcd_watcher import EtcdWatcher
from .guard_records import ARMED, GuardRecord, guard_key, guards_prefix

Post = Callable[..., None]


class GuardWatch:
    """Watches ``app``'s guard records and, on the loop (``post``), arms a new armed one
    (``arm(record, revision)``) unless it is among the ``active`` ids, and drops an ended
    or deleted one (``drop(guard_id, record or None, revision)``).

    The mod revision of a record read in a snapshot is read on the manager's worker
    (``submit``, ``mod_revision``) and comes back on the loop (``then``).
    """

    def __init__(
        self,
        *,
        app: str,
        options: EtcdOptions,
        post: Post,
        log: Any,
        active: Collection[str],
        arm: Callable[[GuardRecord, int], None],
        drop: Callable[..., None],
        submit: Callable[..., Future[Any]],
        mod_revision: Callable[[str], int],
        then: Callable[..., None],
    ) -> None:
        self.app = app
        self.log = log
        self._active = active
        self._arm = arm
        self._drop = drop
        self._submit = submit
        self._mod_revision = mod_revision
        self._then = then
        self._resolving: set[str] = set()
        self._watcher = EtcdWatcher(
            options,
            guards_prefix(app),
            on_snapshot=lambda kvs, rev: post(self._on_snapshot, kvs, rev),
            on_change=lambda change: post(self._on_change, change),
            name="hotknob-guard-watch",
        )

    def start(self) -> None:
        self._watcher.start()

    def stop(self) -> None:
        self._watcher.stop()

    def _on_snapshot(self, kvs: Mapping[str, bytes], revision: int) -> None:
        seen = set()
        for path, raw in kvs.items():
            record = self._parse(path, raw)
            if record is None:
                continue
            seen.add(record.id)
            self._each(path, self._take_snapshot_record, record)
        for guard_id in list(self._active):
            if guard_id not in seen:
                self._drop(guard_id, None)

    def _take_snapshot_record(self, record: GuardRecord) -> None:
        if record.state != ARMED:
            self._drop(record.id, record)
        elif record.id not in self._active and record.id not in self._resolving:
            self._resolving.add(record.id)
            future = self._submit(self._mod_revision, guard_key(self.app, record.id))
            self._then(future, self._arm_resolved, record)

    def _on_change(self, change: EtcdChange) -> None:
        for path in change.deletes:
            self._drop(path.rsplit("/", 1)[-1], None)
        for path, raw in change.puts.items():
            record = self._parse(path, raw)
            if record is None:
                continue
            self._each(path, self._take_changed_record, record, change.revision)

    def _take_changed_record(self, record: GuardRecord, revision: int) -> None:
        if record.state != ARMED:
            self._drop(record.id, record, revision)
        elif record.id not in self._active:
            self._arm(record, revision)

    def _each(self, path: str, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` for one record: a surprise in one never stops the others."""
        try:
            fn(*args)
        except Exception as exc:
            self.log.exception("guard_record_failed", key=path, error=str(exc))

    def _parse(self, path: str, raw: bytes) -> GuardRecord | None:
        try:
            record = GuardRecord.from_json(raw)
        except Exception as exc:  # from_json says ValueError; a record must never stop the rest
            self.log.warning("guard_record_invalid", key=path, error=str(exc))
            return None
        if guard_key(self.app, record.id) != path:
            self.log.warning("guard_record_invalid", key=path, error="id does not match the key")
            return None
        return record

    def _arm_resolved(self, record: GuardRecord, result: int | BaseException) -> None:
        self._resolving.discard(record.id)
        if isinstance(result, BaseException):
            self.log.warning("guard_arm_failed", guard=record.id, error=str(result))
            return
        if result > 0 and record.id not in self._active:
            self._arm(record, result)
