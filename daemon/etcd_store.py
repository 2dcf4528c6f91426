"""The one adapter between hotknob and the etcd client library (``pyetcd``).

Every call into the client lives here or in the modules beside it that this one uses
(``etcd_connect``, ``etcd_client``, ``etcd_stream``, ``etcd_errors``), so the client can
be swapped by rewriting those alone. What it guarantees to callers:

- reads of a prefix are one range request: one consistent state and its revision;
- ``commit`` is one transaction: all puts and deletes land at one revision, or nothing
  does (a failed compare raises ``ConflictError`` and writes nothing);
- every client or gRPC error is mapped (``etcd_errors.map_error``), with
  ``raise ... from exc``::

      HotknobError
      +-- Unavailable            cannot reach etcd (retryable); one line naming the endpoints
      |   +-- TooLargeError      a message from etcd over the receive limit
      |   +-- NoSpaceError       etcd over its space quota (NOSPACE): no writes until compacted
      +-- AuthError              bad credentials or no permission
      +-- CompactedError         the revision asked for was compacted away
      +-- ConflictError          a compare in ``commit`` failed; nothing was written
      +-- InvalidInput           a bad request (duplicate key in a commit)
      |   +-- FutureRevisionError  a read at a revision etcd has not reached
      +-- UsageError             a malformed endpoint, TLS files that do not load

  The password never appears in a message or a repr;
- an expired or invalid auth token is renewed once and the call retried (the client
  library never refreshes its token). The token is renewed on the same client
  (``etcd_connect``), so a watch that client carries goes on;
- a call that may be retried moves to the next endpoint first, whatever the error
  (the client library itself moves only on a few gRPC codes).

``history`` replays a watch (``etcd_history``). ``watch_prefix`` is the low-level
stream used by ``EtcdWatcher``: it groups each watch response's events by revision, so
one transaction is one ``EtcdChange``. Each watch is a gRPC stream of its own, read on a
thread of its own (``etcd_stream``), not the client library's watcher; a watch etcd
refuses raises what it said (a permission denied is an ``AuthError``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias, TypeVar

import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc
from pyetcd.etcdrpc import kv_pb2
from pyetcd.transactions import BaseCompare

from hotknob.config.errors import HotknobError, InvalidInput, Unavailable

from .etcd_connect import Connector
from .etcd_errors import map_error, next_endpoint
from .etcd_history import read_history
from .etcd_stream import WatchStream, key_text, response_changes, watch_request
from .etcd_types import (
    AuthError,
    CompactedError,
    ConflictError,
    EtcdChange,
    EtcdOptions,
    FutureRevisionError,
    History,
    HistoryEntry,
    NoSpaceError,
    PrefixState,
    TokenExpired,
    TooLargeError,
    group_by_revision,
    parse_endpoint,
)

__all__ = [
    "AuthError",
    "CompactedError",
    "ConflictError",
    "EtcdChange",
    "EtcdOptions",
    "EtcdStore",
    "FutureRevisionError",
    "History",
    "HistoryEntry",
    "NoSpaceError",
    "PrefixState",
    "TooLargeError",
    "group_by_revision",
    "map_error",
    "parse_endpoint",
]

T = TypeVar("T")

WatchItem: TypeAlias = list[EtcdChange] | HotknobError

_PUT = kv_pb2.Event.PUT
_NONE: frozenset[str] = frozenset()


def _prefix_end(prefix: str) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    return pyetcd.utils.prefix_range_end(prefix.encode("utf-8", errors="surrogateescape"))


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


class _LeaseIs(BaseCompare):
    """A compare of the lease a key is on (0: none, or no such key), which the client
    library does not offer."""

    def build_compare(self, compare: Any) -> None:
        compare.target = etcdrpc.Compare.LEASE
        compare.lease = int(self.value)


class EtcdStore:
    """Reads, transactional writes, history and leases against one etcd cluster.

    Thread-safe: calls may come from several threads. The client is built on first use
    (no I/O in ``__init__``) and rebuilt after an auth-token error. After ``close()``
    every call raises ``Unavailable``.
    """

    def __init__(self, options: EtcdOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._client: Any = None
        self._closed = False
        self._connector = Connector(options)
        self._streams: list[WatchStream] = []

    def __repr__(self) -> str:
        return f"EtcdStore({self.options.describe()})"

    def _connect(self) -> Any:
        with self._lock:
            if self._closed:
                raise Unavailable(f"etcd client for {self.options.describe()} is closed")
            if self._client is None:
                self._client = self._connector.build()
            return self._client

    def _drop(self, client: Any) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        client.close()

    def _call(self, what: str, fn: Callable[[Any], T], *, idempotent: bool = True) -> T:
        """Run ``fn(client)``; map errors; renew a stale token once; fail over reads."""
        tries = 1 + (len(self.options.endpoints) - 1 if idempotent else 0)
        renewed = False
        while True:
            client = self._connect()
            token = client.metadata
            try:
                return fn(client)
            except Exception as exc:
                err = map_error(exc, self.options, what)
                if isinstance(err, TokenExpired) and not renewed:
                    renewed = True
                    if self.options.user is None:
                        self._drop(client)  # nothing to log in with: a fresh client
                    else:
                        self._connector.renew_token(client, token)
                    continue
                tries -= 1
                if isinstance(err, Unavailable) and tries > 0 and not self._closed:
                    next_endpoint(client)
                    continue
                raise err from exc

    def read_prefix(self, prefix: str, revision: int | None = None) -> tuple[dict[str, bytes], int]:
        """Every key under ``prefix`` and its value, at ``revision`` (default: now).

        Returns the values and the response header's revision: the state is consistent
        at that revision, so a watch from revision + 1 misses nothing.
        """
        state = self.read_prefix_state(prefix, revision)
        return state.values, state.revision

    def read_prefix_state(
        self, prefix: str, revision: int | None = None, *, what: str | None = None
    ) -> PrefixState:
        """As ``read_prefix``, with each key's mod revision and the cluster's id.

        At a past ``revision``, raises ``CompactedError`` below etcd's compaction point
        and ``FutureRevisionError`` above its current revision. ``what`` names the read
        in an error (default: ``read PREFIX``)."""
        rev = None if revision is None or revision <= 0 else revision
        at = "" if rev is None else f" at revision {rev}"
        response = self._call(
            what or f"read {prefix}{at}", lambda c: c.get_prefix_response(prefix, revision=rev)
        )
        return _prefix_state(response)

    def read_key_state(
        self, key: str, revision: int | None = None, *, what: str | None = None
    ) -> PrefixState:
        """As ``read_prefix_state``, of the one key ``key`` (no entry if it does not exist)."""
        response = self._call(
            what or f"read {key}", lambda c: c.get_response(key, revision=revision)
        )
        return _prefix_state(response)

    def mod_revision(self, key: str, revision: int | None = None) -> int:
        """The revision that last changed ``key`` as of ``revision`` (default: now); 0 if
        the key did not exist then."""
        return self.read_key_state(key, revision).mods.get(key, 0)

    def history(self, key_or_prefix: str, *, prefix: bool, limit: int) -> History:
        """The latest ``limit`` changes to a key (or every key under a prefix), newest
        first (``etcd_history``)."""
        return read_history(self, key_or_prefix, prefix=prefix, limit=limit)

    def commit(
        self,
        puts: Mapping[str, str | bytes],
        deletes: Iterable[str] = (),
        *,
        expect_mod_revisions: Mapping[str, int] | None = None,
    ) -> int:
        """Write all ``puts`` and ``deletes`` in ONE transaction; return its revision.

        ``expect_mod_revisions`` maps keys to the mod revision they must still have
        (0: the key must not exist); if any differs, ``ConflictError`` is raised and
        nothing is written. Not retried on another endpoint: a lost answer could hide a
        write that landed.
        """
        deletes = tuple(deletes)
        clash = set(puts) & set(deletes)
        if clash:
            raise InvalidInput(f"a commit cannot both put and delete {sorted(clash)}")
        expected = dict(expect_mod_revisions or {})

        def txn(c: Any) -> tuple[bool, list[Any]]:
            t = c.transactions
            compare = [t.mod(k) == rev for k, rev in expected.items()]
            success = [t.put(k, _bytes(v)) for k, v in puts.items()]
            success += [t.delete(k) for k in deletes]
            failure = [t.get(k) for k in expected]
            ok, responses = c.transaction(compare=compare, success=success, failure=failure)
            return bool(ok), list(responses)

        ok, responses = self._call(f"commit {len(puts) + len(deletes)} keys", txn, idempotent=False)
        if not ok:
            current = {}
            for key, found in zip(expected, responses, strict=True):
                mod = int(found[0][1].mod_revision) if found else 0
                if mod != expected[key]:
                    current[key] = mod
            raise ConflictError(current)
        for response in responses:
            kind = response.WhichOneof("response")
            return int(getattr(response, kind).header.revision)
        return self.current_revision()

    def put(self, key: str, value: str | bytes, lease: int | None = None) -> int:
        """Put one key (optionally on a lease); return the revision it created."""
        response = self._call(
            f"put {key}", lambda c: c.put(key, _bytes(value), lease=lease), idempotent=False
        )
        return int(response.header.revision)

    def put_on_lease(self, key: str, value: str | bytes, lease: int | None) -> bytes | None:
        """Put ``key`` on ``lease`` (None: on none). Returns the value the key held if it
        was on another lease until then (another writer's, or a stopped one's not yet
        expired), else None. A key the lease holds already is written in one request;
        otherwise it is read, then put (two: the value never travels twice in one)."""

        def txn(c: Any) -> tuple[bool, list[Any]]:
            t = c.transactions
            ok, responses = c.transaction(
                compare=[_LeaseIs(key) == (lease or 0)],
                success=[t.put(key, _bytes(value), lease=lease)],
                failure=[t.get(key)],
            )
            return bool(ok), list(responses)

        ok, responses = self._call(f"put {key}", txn, idempotent=False)
        if ok:
            return None
        self.put(key, value, lease=lease)
        found = responses[0] if responses else []
        if found and found[0][1].lease_id not in (0, lease or 0):
            return bytes(found[0][0])
        return None

    def delete_on_lease(self, key: str, lease: int | None) -> bool:
        """Delete ``key`` only if it is on ``lease`` (None: on none); True if it was. What
        another writer put there since is left to it."""

        def txn(c: Any) -> tuple[bool, list[Any]]:
            t = c.transactions
            ok, _ = c.transaction(
                compare=[_LeaseIs(key) == (lease or 0)], success=[t.delete(key)], failure=[]
            )
            return bool(ok), []

        ok, _ = self._call(f"delete {key}", txn, idempotent=False)
        return bool(ok)

    def current_revision(self) -> int:
        """etcd's current revision (from a member status; needs no read permission)."""

        def status(c: Any) -> Any:
            return c.maintenancestub.Status(
                etcdrpc.StatusRequest(),
                c.timeout,
                credentials=c.call_credentials,
                metadata=c.metadata,
            )

        return int(self._call("status", status).header.revision)

    def probe(self, prefix: str) -> int:
        """A cheap linearizable read (count only) under ``prefix``; returns the revision.

        Fails on a hung member and on one cut off from its cluster's leader, which is
        what the watcher's watchdog relies on.
        """
        response = self._call(
            f"probe {prefix}",
            lambda c: c.get_prefix_response(prefix, count_only=True),
            idempotent=False,
        )
        return int(response.header.revision)

    def compact(self, revision: int) -> None:
        """Drop history before ``revision`` (reads and watches below it then fail)."""
        self._call(f"compact at {revision}", lambda c: c.compact(revision))

    def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""
        lease = self._call(f"grant lease ttl={ttl}", lambda c: c.lease(ttl), idempotent=False)
        return int(lease.id)

    def keepalive(self, lease: int) -> int:
        """Refresh a lease; returns its remaining TTL in seconds (0: it has expired)."""
        responses = self._call(f"keep lease {lease} alive", lambda c: list(c.refresh_lease(lease)))
        return int(responses[0].TTL) if responses else 0

    def revoke(self, lease: int) -> None:
        """Revoke a lease (its keys vanish). Revoking an unknown lease is not an error."""
        try:
            self._call(f"revoke lease {lease}", lambda c: c.revoke_lease(lease))
        except HotknobError as exc:
            if "lease not found" not in str(exc):
                raise

    def watch_prefix(
        self, prefix: str, start_revision: int, deliver: Callable[[WatchItem], None]
    ) -> None:
        """Stream changes under ``prefix`` from ``start_revision`` into ``deliver``.

        ``deliver`` runs on the watch's thread and must be quick. It gets a list of changes
        (one per revision, possibly empty: a progress notice) or a mapped error, after
        which the stream is over. The stream ends when the store closes.
        """

        def on_response(response: Any) -> None:
            found = response.events
            if len(found) == 1 and found[0].type == _PUT:
                # The usual response, one put: its change without the grouping's work.
                kv = found[0].kv
                deliver([EtcdChange(kv.mod_revision, {key_text(kv.key): kv.value}, _NONE)])
            else:
                deliver(response_changes(found))

        self.open_watch(prefix, True, start_revision, on_response, deliver)

    def open_watch(
        self,
        key: str,
        prefix: bool,
        start_revision: int,
        on_response: Callable[[Any], None],
        on_error: Callable[[HotknobError], None],
    ) -> WatchStream:
        """Open a watch of its own (``etcd_stream``) of ``key`` or, with ``prefix``, every
        key under it, from ``start_revision``; ``on_response`` gets each raw response.
        ``on_error`` gets the mapped reason the stream ended, unless it was cancelled
        (``end_watch``, or the store's ``close``)."""
        options = self.options
        what = f"watch {key}"

        def on_end(exc: BaseException | None) -> None:
            on_error(map_error(exc or etcd_exc.ConnectionFailedError(), options, what))

        range_end = _prefix_end(key) if prefix else None
        request = watch_request(key, range_end, start_revision)

        def add(c: Any) -> WatchStream:
            stream = WatchStream(request, on_response, on_end, name=f"hotknob-etcd-watch {key}")
            with self._lock:
                if self._closed:
                    raise Unavailable(f"etcd client for {options.describe()} is closed")
                self._streams.append(stream)
            stream.open(c.start_watch, options.timeout)
            return stream

        return self._call(f"{what} from revision {start_revision}", add, idempotent=False)

    def end_watch(self, stream: WatchStream) -> None:
        """Cancel a stream ``open_watch`` opened, before the store closes."""
        stream.cancel()
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)

    def close(self, join_timeout: float = 5.0) -> None:
        """Close the client: cancels calls and watches, and waits for the watch thread."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            streams, self._streams = self._streams, []
        for stream in streams:  # first: the client's close then cancels nothing of ours
            stream.cancel()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        for stream in streams:
            stream.join(join_timeout)


def _prefix_state(response: Any) -> PrefixState:
    """A range response's keys, values and mod revisions, its revision and cluster id."""
    values = {key_text(kv.key): bytes(kv.value) for kv in response.kvs}
    mods = {key_text(kv.key): int(kv.mod_revision) for kv in response.kvs}
    header = response.header
    return PrefixState(values, mods, int(header.revision), int(header.cluster_id))
