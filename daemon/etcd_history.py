"""A key's (or a prefix's) history of changes, replayed from etcd (``read_history``).

etcd keeps history as events, and reads at a revision cannot see deletes, so the
history is a watch replayed from the oldest revision kept (etcd's compaction point, then
``History.reached_compaction`` is set) up to the current revision. etcd sends such a
catch-up in batches of whole revisions, each headed by the then-current revision and
holding every event up to it unless cut at ``_WATCH_BATCH_REVS``.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hotknob.config.errors import HotknobError, Unavailable

from .etcd_stream import response_changes
from .etcd_types import CompactedError, EtcdChange, History, HistoryEntry

if TYPE_CHECKING:
    from .etcd_store import EtcdStore

__all__ = ["read_history"]

# etcd cuts a watch catch-up response after this many revisions (mvcc watchBatchMaxRevs).
_WATCH_BATCH_REVS = 1000
# With no event promised, how long a history replay waits for a (next) batch.
_QUIET_S = 1.0


@dataclass(frozen=True)
class _Batch:
    header_revision: int
    changes: list[EtcdChange]


def read_history(store: EtcdStore, key_or_prefix: str, *, prefix: bool, limit: int) -> History:
    """The latest ``limit`` changes to a key (or every key under a prefix), newest first."""
    what = f"history of {key_or_prefix}"
    if prefix:
        now = store.read_prefix_state(key_or_prefix, what=what)
    else:
        now = store.read_key_state(key_or_prefix, what=what)
    head = now.revision
    newest = max(now.mods.values(), default=0)
    start, compacted = 1, False
    while True:
        try:
            changes = _replay(store, key_or_prefix, prefix, start, head, newest)
            break
        except CompactedError as exc:
            if exc.compact_revision is None or exc.compact_revision <= start:
                raise
            start, compacted = exc.compact_revision, True
    entries: list[HistoryEntry] = []
    if compacted:  # a key last written before the compaction point: the value in force
        entries += [
            HistoryEntry(key, now.values[key], mod) for key, mod in now.mods.items() if mod < start
        ]
    for change in reversed(changes):
        entries += [HistoryEntry(k, None, change.revision) for k in sorted(change.deletes)]
        entries += [HistoryEntry(k, v, change.revision) for k, v in sorted(change.puts.items())]
    entries.sort(key=lambda e: (-e.revision, e.key))
    return History(entries[:limit], compacted)


def _replay(
    store: EtcdStore, key: str, prefix: bool, start: int, head: int, newest: int
) -> list[EtcdChange]:
    """All changes in [start, head]; ``newest`` (the newest mod revision of the keys
    that exist at ``head``) is a put that must come, if it is ``>= start``.

    A batch cut at ``_WATCH_BATCH_REVS`` does not say whether more follow: etcd sends
    the next one at once if there is one, and nothing if not. Past ``newest`` only
    deletes can follow (of keys absent at ``head``): for one key that exists at
    ``head`` none can, and otherwise they are waited for a quiet while (``_QUIET_S``,
    ten times etcd's pause between catch-up batches), not for a lost etcd's timeout.
    """
    got: queue.SimpleQueue[_Batch | HotknobError] = queue.SimpleQueue()

    def on_response(response: Any) -> None:
        got.put(_Batch(response.header.revision, response_changes(response.events)))

    timeout = store.options.timeout
    stream = store.open_watch(key, prefix, start, on_response, got.put)
    changes: list[EtcdChange] = []
    last = start - 1
    try:
        while True:
            expect = newest > last
            try:
                item = got.get(timeout=timeout if expect else _QUIET_S)
            except queue.Empty:
                if expect:
                    raise Unavailable(
                        f"cannot reach etcd at {store.options.describe()} "
                        f"(history of {key}): no answer within {timeout:g}s"
                    ) from None
                return changes
            if isinstance(item, HotknobError):
                raise item
            changes += [c for c in item.changes if c.revision <= head]
            last = max(last, item.changes[-1].revision if item.changes else 0)
            if last >= head or (
                item.header_revision >= head and len(item.changes) < _WATCH_BATCH_REVS
            ):
                return changes
            if not prefix and 0 < newest <= last:
                return changes  # the key's last put is in, and it exists at ``head``
    finally:
        store.end_watch(stream)
