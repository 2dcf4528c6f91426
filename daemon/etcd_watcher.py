"""A resilient watch of one etcd prefix, on a background thread of its own.

The contract (each point is tested against a real etcd):

- the prefix is read once at revision R (``on_snapshot``), then watched from R + 1, so a
  write between the read and the watch is not lost;
- every revision under the prefix arrives exactly once, in order, as one
  ``EtcdChange`` (a multi-key transaction is one change), through ``on_change``;
- after any error the watch resumes from the last delivered revision + 1 (never from
  the snapshot revision), with capped, jittered backoff, trying the endpoints in turn;
- when etcd has compacted past that revision, the prefix is read again in full and
  delivered through ``on_snapshot``; the consumer diffs it against what it had. So it
  is when etcd comes back below that revision (restored from a backup): its revisions
  then count from the backup's, and the consumer must take them as they are;
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

import structlog

from hotknob.config.errors import HotknobError
from hotknob.daemon.etcd_store import (
    CompactedError,
    EtcdChange,
    EtcdOptions,
    EtcdStore,
    WatchItem,
)

log = structlog.get_logger(__name__)

_STOP = object()


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
        name: str = "hotknob-etcd-watch",
    ) -> None:
        self.options = options
        self.prefix = prefix
        self._on_snapshot = on_snapshot
        self._on_change = on_change
        self._on_connection = on_connection
        self._hung_after = hung_after
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._store: EtcdStore | None = None
        self._queue: queue.SimpleQueue[WatchItem | object] | None = None
        self._last_revision = 0
        self._last_message = 0.0
        self._connected: bool | None = None
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
            store, pending = self._store, self._queue
        if pending is not None:
            pending.put(_STOP)
        if store is not None:
            store.close()
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
            endpoint = endpoints[attempt % len(endpoints)]
            store = EtcdStore(dataclasses.replace(self.options, endpoints=(endpoint,)))
            inbox: queue.SimpleQueue[WatchItem | object] = queue.SimpleQueue()
            with self._lock:
                if self._stopping.is_set():
                    break
                self._store, self._queue = store, inbox
            try:
                if not need_snapshot and self._went_back(store):
                    need_snapshot = True
                if need_snapshot:
                    values, revision = store.read_prefix(self.prefix)
                    self._last_revision = revision
                    self._call(self._on_snapshot, values, revision)
                    need_snapshot = False
                    self._ready.set()
                self._last_message = time.monotonic()
                store.watch_prefix(self.prefix, self._last_revision + 1, self._deliver_to(inbox))
                self._set_connected(
                    True, f"watching {self.prefix} on {endpoint} from {self._last_revision + 1}"
                )
                self._backoff.reset()
                self._pump(store, inbox)
            except CompactedError as exc:
                log.info("etcd_resync", prefix=self.prefix, reason=str(exc))
                need_snapshot = True
            except HotknobError as exc:
                if self._stopping.is_set():
                    break
                self._set_connected(False, str(exc))
                attempt += 1
                self._stopping.wait(self._backoff.next())
            finally:
                store.close()
        with self._lock:
            self._store = self._queue = None

    def _went_back(self, store: EtcdStore) -> bool:
        """Whether etcd is now below the last revision delivered: restored from a backup
        (or replaced). A watch from that revision + 1 would wait for a future the cluster
        may never reach, and skip every change up to it: the prefix is read again."""
        now = store.current_revision()
        if now >= self._last_revision:
            return False
        log.warning(
            "etcd_revision_went_back",
            prefix=self.prefix,
            last_delivered=self._last_revision,
            now=now,
            detail="etcd restored from a backup? reading the prefix again",
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
            for change in item:
                if change.revision <= self._last_revision:
                    continue
                self._last_revision = change.revision
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
