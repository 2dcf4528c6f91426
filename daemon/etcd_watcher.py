"""A resilient watch of one etcd prefix, on a background thread of its own.

The contract (each point is tested against a real etcd):

- the prefix is read once at revision R (``on_snapshot``), then watched from R + 1, so a
  write between the read and the watch is not lost;
- every revision under the prefix arrives exactly once, in order, as one
  ``EtcdChange`` (a multi-key transaction is one change), through ``on_change``;
- the first read asks the next endpoint when one fails or has not answered within
  ``next_after`` seconds, keeps the earlier reads going and takes the first answer,
  so one hung member does not hold up the start;
- after any error the watch resumes from the last delivered revision + 1 (never from
  the snapshot revision), with capped, jittered backoff, trying the endpoints in turn.
  The backoff starts again from its shortest delay only after a stream that delivered
  something or stayed up ``stable_after`` seconds;
- when etcd has compacted past that revision, the prefix is read again in full and
  delivered through ``on_snapshot``; the consumer diffs it against what it had. So it
  is when a catch-up is too large for the client to take, and when etcd's history no
  longer leads to what was delivered: before each resume the prefix as of the last
  delivered revision is read and compared, each key's value and mod revision, and the
  id of the cluster that answers. That catches etcd restored from a backup (below that
  revision), another cluster, and etcd wiped and written again (possibly past it, or
  the same keys at the same revisions with other values); the consumer takes the new
  revisions as they are;
- a hung server (alive but silent, e.g. SIGSTOP) is detected within
  ``hung_after + options.timeout`` seconds: after ``hung_after`` seconds without a
  message the watcher probes with a linearizable read, and a failed probe counts as a
  broken stream. gRPC keepalive (in the store's channel options) is a second line.
  The probe also catches a member cut off from its leader, whose stream stays open
  but silent;
- ``on_connection(connected, detail)`` reports each transition, for status and logs.

Callbacks run in order and must be quick: the consumer hands the data to its own loop.
``on_change`` runs on the client library's watch thread, straight from the watch
response (no hand-over to another thread on the way); ``on_snapshot`` and
``on_connection`` run on the watcher's own thread, which reads snapshots, reconnects
and probes a silent stream. They never run at the same time: a snapshot is read
before its watch starts, and a stream's changes end before it is replaced. An
exception in a callback is logged and does not stop the watch. Only ``etcd_store``
talks to the client library.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import TypeAlias

import structlog

from hotknob.config.errors import HotknobError, UsageError
from hotknob.daemon.etcd_first_read import FirstRead
from hotknob.daemon.etcd_store import (
    CompactedError,
    EtcdChange,
    EtcdOptions,
    EtcdStore,
    FutureRevisionError,
    PrefixState,
    TooLargeError,
    WatchItem,
)

log = structlog.get_logger(__name__)

_STOP = object()

# Each key under the prefix: the revision that last changed it, and its value's hash.
_Seen: TypeAlias = dict[str, tuple[int, int]]


def _seen(state: PrefixState) -> _Seen:
    return {key: (state.mods[key], hash(value)) for key, value in state.values.items()}


class Backoff:
    """Capped exponential backoff with jitter: delays in [d/2, d], d doubling to ``cap``."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial, self.cap = initial, cap
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)


class EtcdWatcher:
    """Watches ``prefix``; ``start()`` launches the thread, ``stop()`` ends it (idempotent)."""

    def __init__(
        self,
        options: EtcdOptions,
        prefix: str,
        *,
        on_snapshot: Callable[[dict[str, bytes], int], None],
        on_change: Callable[[EtcdChange], None],
        on_connection: Callable[[bool, str], None] | None = None,
        hung_after: float = 3.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        stable_after: float = 3.0,
        next_after: float = 0.5,
        name: str = "hotknob-etcd-watch",
    ) -> None:
        self.options = options
        self.prefix = prefix
        self._on_snapshot = on_snapshot
        self._on_change = on_change
        self._on_connection = on_connection
        self._hung_after = hung_after
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._stable_after = stable_after
        self._next_after = next_after
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._store: EtcdStore | None = None
        self._racing: FirstRead | None = None  # a first read under way
        self._queue: queue.SimpleQueue[WatchItem | object] | None = None
        self._last_revision = 0
        # Each key under the prefix as delivered, and the cluster that delivered it.
        self._seen: _Seen = {}
        self._cluster_id: int | None = None
        self._last_message = 0.0
        self._delivered = False  # the current stream has handed over a message
        self._connected: bool | None = None
        self._refused: str | None = None  # the client's refusal of its options, as logged
        self._started = False

    @property
    def last_revision(self) -> int:
        """The revision of the last snapshot or change delivered (0 before the first)."""
        return self._last_revision

    @property
    def connected(self) -> bool:
        return bool(self._connected)

    def start(self) -> EtcdWatcher:
        """Start the thread (once; a second call is a no-op). A stopped watcher stays so."""
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("an EtcdWatcher cannot be started after stop()")
            if self._started:
                return self
            self._started = True
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the first snapshot has been delivered."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and close the client; safe to call twice or before ``start``."""
        with self._lock:
            self._stopping.set()
            store, pending, racing = self._store, self._queue, self._racing
        if pending is not None:
            pending.put(_STOP)
        if store is not None:
            store.close()
        if racing is not None:
            racing.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> EtcdWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        endpoints = self.options.endpoints
        attempt = 0
        need_snapshot = True
        while not self._stopping.is_set():
            inbox: queue.SimpleQueue[WatchItem | object] = queue.SimpleQueue()
            store: EtcdStore | None = None
            watching_since: float | None = None
            try:
                first: PrefixState | None = None
                if need_snapshot and not self._ready.is_set() and len(endpoints) > 1:
                    attempt, store, first = self._read_from_any()
                else:
                    store = self._new_store(endpoints[attempt % len(endpoints)])
                if not self._adopt(store, inbox):
                    break
                endpoint = endpoints[attempt % len(endpoints)]
                if not need_snapshot and self._history_changed(store):
                    need_snapshot = True
                if need_snapshot:
                    state = first if first is not None else store.read_prefix_state(self.prefix)
                    self._last_revision, self._seen = state.revision, _seen(state)
                    self._cluster_id = state.cluster_id
                    self._call(self._on_snapshot, state.values, state.revision)
                    need_snapshot = False
                    self._ready.set()
                self._last_message = time.monotonic()
                self._delivered = False
                store.watch_prefix(self.prefix, self._last_revision + 1, self._deliver_to(inbox))
                watching_since = time.monotonic()
                self._set_connected(
                    True, f"watching {self.prefix} on {endpoint} from {self._last_revision + 1}"
                )
                self._refused = None
                self._pump(store, inbox)
            except HotknobError as exc:
                if self._stopping.is_set():
                    break
                # Compacted: the revisions missed are gone. Too large: the same watch
                # would fail the same way. Either way one full read replaces them (a
                # failed full read is an error like any other).
                if isinstance(exc, CompactedError) or (
                    isinstance(exc, TooLargeError) and not need_snapshot
                ):
                    log.info("etcd_resync", prefix=self.prefix, reason=str(exc))
                    need_snapshot = True
                    continue
                # Only a stream that worked for a while earns a quick retry: one that
                # fails as soon as it is made would otherwise be made again at once,
                # over and over.
                if watching_since is not None and (
                    self._delivered or time.monotonic() - watching_since >= self._stable_after
                ):
                    self._backoff.reset()
                self._set_connected(False, str(exc))
                if isinstance(exc, UsageError) and str(exc) != self._refused:
                    # TLS files replaced since the start by ones that do not load: not
                    # etcd's fault, and said as such, once, not only as etcd lost.
                    self._refused = str(exc)
                    log.error("etcd_tls_files_refused", prefix=self.prefix, detail=str(exc))
                attempt += 1
                self._stopping.wait(self._backoff.next())
            finally:
                if store is not None:
                    store.close()
        with self._lock:
            self._store = self._queue = None

    def _new_store(self, endpoint: str) -> EtcdStore:
        return EtcdStore(dataclasses.replace(self.options, endpoints=(endpoint,)))

    def _adopt(self, store: EtcdStore, inbox: queue.SimpleQueue[WatchItem | object]) -> bool:
        """Make ``store`` and ``inbox`` the current ones (``stop`` closes them); False when
        stopping."""
        with self._lock:
            if self._stopping.is_set():
                return False
            self._store, self._queue = store, inbox
            return True

    def _read_from_any(self) -> tuple[int, EtcdStore, PrefixState]:
        """The first full read, from the endpoints in overlapping turns; the first
        answer is taken (``etcd_first_read``). Returns the index of the endpoint that
        answered, its store (kept, to watch on) and what it read."""
        race = FirstRead(
            self.options,
            self.prefix,
            self._new_store,
            self._stopping,
            next_after=self._next_after,
            name=self._thread.name,
        )
        with self._lock:
            stopping = self._stopping.is_set()
            if not stopping:
                self._racing = race
        if stopping:
            race.close()
            raise HotknobError("stopping")
        try:
            return race.read()
        finally:
            with self._lock:
                self._racing = None

    def _history_changed(self, store: EtcdStore) -> bool:
        """Whether etcd's history no longer leads to what was delivered.

        A watch from the last delivered revision + 1 is right only on the same history.
        etcd restored from a backup is below that revision; a cluster wiped and written
        again may be past it, with other changes at the same revisions, and a watch
        would then skip its earlier revisions. So the prefix is read as of that
        revision and compared with what was delivered: the id of the cluster, and each
        key's mod revision and value (its hash). Values too: a wiped etcd written again
        by the same script gives the same keys the same revisions, and a member wiped
        and started again with the same name and peer URLs keeps its cluster's id.
        Compacted, the read raises ``CompactedError`` and the prefix is read again all
        the same. One read of the prefix per reconnect, none while a stream is up.
        """
        try:
            now = store.read_prefix_state(self.prefix, self._last_revision)
        except FutureRevisionError:
            log.warning(
                "etcd_revision_went_back",
                prefix=self.prefix,
                last_delivered=self._last_revision,
                detail="etcd restored from a backup? reading the prefix again",
            )
            return True
        if now.cluster_id != self._cluster_id:
            log.warning(
                "etcd_cluster_changed",
                prefix=self.prefix,
                last_delivered=self._last_revision,
                cluster_id=f"{now.cluster_id:x}",
                was=f"{self._cluster_id or 0:x}",
                detail="another etcd cluster answers: reading the prefix again",
            )
            return True
        seen = _seen(now)
        if seen == self._seen:
            return False
        differ = [k for k in seen.keys() | self._seen.keys() if seen.get(k) != self._seen.get(k)]
        log.warning(
            "etcd_history_changed",
            prefix=self.prefix,
            last_delivered=self._last_revision,
            keys_differing=len(differ),
            detail="etcd replaced or wiped and written again? reading the prefix again",
        )
        return True

    def _deliver_to(
        self, inbox: queue.SimpleQueue[WatchItem | object]
    ) -> Callable[[WatchItem], None]:
        """The stream's callback, on the library's watch thread: changes go straight to
        ``on_change``; an error goes to ``inbox``, for this watcher's thread to act on."""

        def deliver(item: WatchItem) -> None:
            if self._stopping.is_set() or self._queue is not inbox:
                return  # stopping, or a stream already replaced
            self._last_message = time.monotonic()
            if not isinstance(item, list):
                inbox.put(item)
                return
            self._delivered = True
            for change in item:
                if change.revision <= self._last_revision:
                    continue
                self._last_revision = change.revision
                for key in change.deletes:
                    self._seen.pop(key, None)
                for key, value in change.puts.items():
                    self._seen[key] = (change.revision, hash(value))
                self._call(self._on_change, change)

        return deliver

    def _pump(self, store: EtcdStore, inbox: queue.SimpleQueue[WatchItem | object]) -> None:
        """Watch over the stream until it fails (raises) or the watcher stops (returns).

        After ``hung_after`` seconds without a message on the stream, probe the server.
        """
        while not self._stopping.is_set():
            silent = time.monotonic() - self._last_message
            try:
                item = inbox.get(timeout=max(0.0, self._hung_after - silent))
            except queue.Empty:
                if time.monotonic() - self._last_message >= self._hung_after:
                    store.probe(self.prefix)
                    self._last_message = time.monotonic()
                continue
            if item is _STOP:
                return
            if isinstance(item, HotknobError):
                raise item

    def _set_connected(self, connected: bool, detail: str) -> None:
        if self._connected == connected:
            return
        self._connected = connected
        log.info(
            "etcd_connected" if connected else "etcd_disconnected",
            prefix=self.prefix,
            revision=self._last_revision,
            detail=detail,
        )
        if self._on_connection is not None:
            self._call(self._on_connection, connected, detail)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("etcd_watch_callback_failed", prefix=self.prefix)
