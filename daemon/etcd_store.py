"""The one adapter between hotknob and the etcd client library (``pyetcd``).

Every call into the client lives here, so the client can be swapped by rewriting this
module alone. What it guarantees to callers:

- reads of a prefix are one range request: one consistent state and its revision;
- ``commit`` is one transaction: all puts and deletes land at one revision, or nothing
  does (a failed compare raises ``ConflictError`` and writes nothing);
- every client or gRPC error is mapped here, with ``raise ... from exc``::

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
  library never refreshes its token). The token is renewed on the same client, so a
  watch that client carries goes on;
- a call that may be retried moves to the next endpoint first, whatever the error
  (the client library itself moves only on a few gRPC codes).

``watch_prefix`` is the low-level stream used by ``EtcdWatcher``: it groups each watch
response's events by revision, so one transaction is one ``EtcdChange``. Each watch is
a gRPC stream of its own, read on a thread of its own (``etcd_stream``), not the client
library's watcher; a watch etcd refuses raises what it said (a permission denied is an
``AuthError``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
import grpc.experimental
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc
from pyetcd.client import EtcdTokenCallCredentials
from pyetcd.etcdrpc import kv_pb2

from hotknob.config.errors import HotknobError, InvalidInput, Unavailable, UsageError

from .etcd_client import ClosableClient
from .etcd_stream import WatchCanceled, WatchStream, watch_request
from .etcd_types import (
    MIN_KEEPALIVE_S,
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

# etcd cuts a watch catch-up response after this many revisions (mvcc watchBatchMaxRevs).
_WATCH_BATCH_REVS = 1000
# With no event promised, how long a history replay waits for a (next) batch.
_QUIET_S = 1.0


WatchItem: TypeAlias = list[EtcdChange] | HotknobError


@dataclass(frozen=True)
class _Batch:
    header_revision: int
    changes: list[EtcdChange]


_PUT = kv_pb2.Event.PUT
_DELETE = kv_pb2.Event.DELETE
_NONE: frozenset[str] = frozenset()


def _key(raw: bytes) -> str:
    return raw.decode("utf-8", errors="surrogateescape")


def _changes(events: Any) -> list[EtcdChange]:
    """A watch response's events (``mvccpb.Event``), one change per revision."""
    return group_by_revision(
        (e.kv.mod_revision, _key(e.kv.key), None if e.type == _DELETE else e.kv.value)
        for e in events
    )


def _prefix_end(prefix: str) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    return pyetcd.utils.prefix_range_end(prefix.encode("utf-8", errors="surrogateescape"))


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def _rpc_error(exc: BaseException) -> grpc.RpcError | None:
    """The gRPC error behind ``exc``; the client re-raises its own types from inside it."""
    for candidate in (exc, exc.__context__, exc.__cause__):
        if isinstance(candidate, grpc.RpcError):
            return candidate
    return None


def _next_endpoint(client: Any) -> None:
    """Make ``client``'s next call go to another endpoint.

    The client library moves on only after UNAVAILABLE, DEADLINE_EXCEEDED or INTERNAL;
    an endpoint that answers anything else (an HTTP 404 from a proxy or a wrong port is
    UNIMPLEMENTED) would be asked again. Marking it failed makes the library pick the
    next one that has not failed (for ``time_retry`` seconds); its cached stubs are
    bound to the old channel, so they go too.
    """
    with contextlib.suppress(Exception):
        client.endpoint_in_use.fail()
        client._clear_old_stubs()


def map_error(exc: BaseException, options: EtcdOptions, what: str) -> HotknobError:
    """Translate a client/gRPC error from ``what`` (e.g. "read /p/") into hotknob's tree."""
    if isinstance(exc, HotknobError):
        return exc
    where = options.describe()
    if isinstance(exc, etcd_exc.RevisionCompactedError):
        rev = exc.compacted_revision
        return CompactedError(f"etcd {what}: revision compacted (oldest kept: {rev})", rev)
    if isinstance(exc, WatchCanceled):
        reason = exc.reason.removeprefix("etcdserver: ")
        if "permission denied" in reason:
            user = f" as user {options.user!r}" if options.user else ""
            return AuthError(f"etcd {what}{user} at {where}: {reason}")
        if "compacted" in reason:
            return CompactedError(f"etcd {what}: {reason}")
        return Unavailable(f"etcd at {where} cancelled the {what}: {reason}")
    rpc = _rpc_error(exc)
    code = rpc.code() if rpc is not None and hasattr(rpc, "code") else None
    details = ""
    if rpc is not None and hasattr(rpc, "details"):
        details = (rpc.details() or "").splitlines()[0] if rpc.details() else ""
    details = details.removeprefix("etcdserver: ")
    if code == grpc.StatusCode.UNAUTHENTICATED or "auth token" in details:
        return TokenExpired(f"etcd {what}: {details or 'unauthenticated'}")
    if "user name is empty" in details and options.user is None:  # etcd has auth on
        return AuthError(
            f"etcd {what} at {where}: etcd requires authentication: give a user "
            "(--etcd-user or HOTKNOB_ETCD_USER) and its password (HOTKNOB_ETCD_PASSWORD)"
        )
    if "authentication" in details or code == grpc.StatusCode.PERMISSION_DENIED:
        user = f" as user {options.user!r}" if options.user else ""
        return AuthError(f"etcd {what}{user} at {where}: {details}")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return CompactedError(f"etcd {what}: {details}")
    if code == grpc.StatusCode.OUT_OF_RANGE and "future" in details:
        return FutureRevisionError(f"etcd {what}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "database space exceeded" in details:
        return NoSpaceError(
            f"etcd at {where} is out of space ({what}: {details}): it takes no writes until "
            "its history is compacted, it is defragmented and its NOSPACE alarm disarmed "
            '(docs/deploy.md, "etcd\'s space")'
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return TooLargeError(f"cannot take etcd's answer from {where} ({what}): {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT and "too many operations" in details:
        return InvalidInput(
            f"etcd {what}: {details}: etcd takes at most its --max-txn-ops operations (128 "
            "by default) in one transaction, and hotknob writes every key of a change, and a "
            "record of who made it, in one: change fewer keys at once (a section or mapping "
            "with more keys than that: unset its keys a few at a time, each a change of its "
            "own), or raise etcd's --max-txn-ops"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(f"etcd {what}: {details}")
    if isinstance(exc, etcd_exc.NoServerAvailableError):
        reason = "no endpoint available (all failed recently)"
    elif isinstance(exc, etcd_exc.ConnectionTimeoutError | etcd_exc.WatchTimedOut) or (
        code == grpc.StatusCode.DEADLINE_EXCEEDED
    ):
        reason = f"no answer within {options.timeout:g}s"
    elif isinstance(exc, etcd_exc.ConnectionFailedError) or code == grpc.StatusCode.UNAVAILABLE:
        reason = f"connection failed ({details})" if details else "connection failed"
    elif code == grpc.StatusCode.CANCELLED:
        reason = "request cancelled (client closed)"
    else:
        reason = details or type(exc).__name__
    return Unavailable(f"cannot reach etcd at {where} ({what}): {reason}")


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
        self._auth_lock = threading.Lock()
        self._streams: list[WatchStream] = []

    def __repr__(self) -> str:
        return f"EtcdStore({self.options.describe()})"

    def _grpc_options(self) -> list[tuple[str, Any]]:
        o = self.options
        return [
            ("grpc.keepalive_time_ms", int(max(o.keepalive_time, MIN_KEEPALIVE_S) * 1000)),
            ("grpc.keepalive_timeout_ms", int(o.keepalive_timeout * 1000)),
            ("grpc.http2.ping_timeout_ms", int(o.keepalive_timeout * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # etcd sends every revision a watch missed in one message, and a range read
            # in one: gRPC's default 4 MiB limit refused those outright.
            ("grpc.max_receive_message_length", o.max_receive_bytes),
            # A watch's responses read on the watch's own thread (``etcd_client``).
            (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
        ]

    def _build(self) -> Any:
        o = self.options
        creds = None
        if o.tls or any(parse_endpoint(e)[2] for e in o.endpoints):
            # Again at each build, not only at the start: files replaced since (a
            # certificate renewed before its key) are refused here, not by gRPC.
            o.check_tls_files()
            try:
                if o.ca_cert is not None:
                    creds = pyetcd.MultiEndpointEtcd3Client.get_secure_creds(
                        o.ca_cert, cert_key=o.cert_key, cert_cert=o.cert_cert
                    )
                else:
                    creds = grpc.ssl_channel_credentials()
            except OSError as exc:
                raise UsageError(f"cannot read etcd TLS files: {exc}") from exc
        endpoints = []
        for text in o.endpoints:
            host, port, secure = parse_endpoint(text)
            is_secure = secure if secure is not None else o.tls
            endpoints.append(
                pyetcd.Endpoint(
                    f"[{host}]" if ":" in host else host,  # an IPv6 address: gRPC's form
                    port,
                    secure=is_secure,
                    creds=creds if is_secure else None,
                    time_retry=o.time_retry,
                    opts=self._grpc_options(),
                )
            )
        # With credentials the client authenticates at once, on an endpoint it picks at
        # random and without failing over: one dead member must not fail the build, so an
        # endpoint that cannot be reached is tried again (another pick), a few times each.
        attempts = 3 * len(endpoints) if o.user else 1
        while True:
            try:
                client = ClosableClient(
                    endpoints, timeout=o.timeout, user=o.user, password=o.password, failover=True
                )
                break
            except Exception as exc:
                err = map_error(exc, o, "authenticate")
                attempts -= 1
                if isinstance(err, Unavailable) and attempts > 0:
                    continue
                for endpoint in endpoints:
                    endpoint.close()
                raise err from exc
        if not any(e.secure for e in endpoints):
            # gRPC refuses call credentials on a plaintext channel; the token also
            # travels as metadata, which is all etcd reads.
            client.call_credentials = None
        return client

    def _connect(self) -> Any:
        with self._lock:
            if self._closed:
                raise Unavailable(f"etcd client for {self.options.describe()} is closed")
            if self._client is None:
                self._client = self._build()
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
                        self._renew_token(client, token)
                    continue
                tries -= 1
                if isinstance(err, Unavailable) and tries > 0 and not self._closed:
                    _next_endpoint(client)
                    continue
                raise err from exc

    def _renew_token(self, client: Any, stale: Any) -> None:
        """Log in again and give ``client`` the new token, for the calls that follow.

        The client is kept, not rebuilt: closing it would also end the watch it carries
        (etcd checks the token when a watch is created, not on each event), and with a
        short token TTL an idle watcher's probe would then break its own watch every
        few seconds. ``stale`` is the token the failed call used: when another thread
        has renewed it meanwhile, that one is used.
        """
        o = self.options
        with self._auth_lock:
            if client.metadata is not stale:
                return
            request = etcdrpc.AuthenticateRequest(name=o.user, password=o.password)
            try:
                response = client.authstub.Authenticate(request, client.timeout)
            except Exception as exc:
                raise map_error(exc, o, "authenticate") from exc
            client.metadata = (("token", response.token),)
            if client.call_credentials is not None:
                client.call_credentials = grpc.metadata_call_credentials(
                    EtcdTokenCallCredentials(response.token)
                )

    def read_prefix(self, prefix: str, revision: int | None = None) -> tuple[dict[str, bytes], int]:
        """Every key under ``prefix`` and its value, at ``revision`` (default: now).

        Returns the values and the response header's revision: the state is consistent
        at that revision, so a watch from revision + 1 misses nothing.
        """
        state = self.read_prefix_state(prefix, revision)
        return state.values, state.revision

    def read_prefix_state(self, prefix: str, revision: int | None = None) -> PrefixState:
        """As ``read_prefix``, with each key's mod revision and the cluster's id.

        At a past ``revision``, raises ``CompactedError`` below etcd's compaction point
        and ``FutureRevisionError`` above its current revision."""
        rev = None if revision is None or revision <= 0 else revision
        at = "" if rev is None else f" at revision {rev}"
        response = self._call(
            f"read {prefix}{at}", lambda c: c.get_prefix_response(prefix, revision=rev)
        )
        values = {_key(kv.key): bytes(kv.value) for kv in response.kvs}
        mods = {_key(kv.key): int(kv.mod_revision) for kv in response.kvs}
        header = response.header
        return PrefixState(values, mods, int(header.revision), int(header.cluster_id))

    def mod_revision(self, key: str, revision: int | None = None) -> int:
        """The revision that last changed ``key`` as of ``revision`` (default: now); 0 if
        the key did not exist then."""
        response = self._call(f"read {key}", lambda c: c.get_response(key, revision=revision))
        return int(response.kvs[0].mod_revision) if response.kvs else 0

    def history(self, key_or_prefix: str, *, prefix: bool, limit: int) -> History:
        """The latest ``limit`` changes to a key (or every key under a prefix), newest first.

        etcd keeps history as events, and reads at a revision cannot see deletes, so
        this replays a watch from the oldest revision kept (etcd's compaction point,
        then ``reached_compaction`` is set) up to the current revision. etcd sends the
        catch-up in batches of whole revisions, each headed by the then-current
        revision and holding every event up to it unless cut at ``_WATCH_BATCH_REVS``.
        """
        what = f"history of {key_or_prefix}"
        if prefix:
            response = self._call(what, lambda c: c.get_prefix_response(key_or_prefix))
        else:
            response = self._call(what, lambda c: c.get_response(key_or_prefix))
        head = int(response.header.revision)
        newest = max((int(kv.mod_revision) for kv in response.kvs), default=0)
        start, compacted = 1, False
        while True:
            try:
                changes = self._replay(key_or_prefix, prefix, start, head, newest)
                break
            except CompactedError as exc:
                if exc.compact_revision is None or exc.compact_revision <= start:
                    raise
                start, compacted = exc.compact_revision, True
        entries: list[HistoryEntry] = []
        if compacted:  # a key last written before the compaction point: the value in force
            entries += [
                HistoryEntry(_key(kv.key), kv.value, int(kv.mod_revision))
                for kv in response.kvs
                if int(kv.mod_revision) < start
            ]
        for change in reversed(changes):
            entries += [HistoryEntry(k, None, change.revision) for k in sorted(change.deletes)]
            entries += [HistoryEntry(k, v, change.revision) for k, v in sorted(change.puts.items())]
        entries.sort(key=lambda e: (-e.revision, e.key))
        return History(entries[:limit], compacted)

    def _replay(
        self, key: str, prefix: bool, start: int, head: int, newest: int
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
            got.put(_Batch(response.header.revision, _changes(response.events)))

        stream = self._add_watch(key, prefix, start, on_response, got.put)
        changes: list[EtcdChange] = []
        last = start - 1
        try:
            while True:
                expect = newest > last
                try:
                    item = got.get(timeout=self.options.timeout if expect else _QUIET_S)
                except queue.Empty:
                    if expect:
                        reason = f"no answer within {self.options.timeout:g}s"
                        raise Unavailable(
                            f"cannot reach etcd at {self.options.describe()} "
                            f"(history of {key}): {reason}"
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
            stream.cancel()
            with self._lock:
                if stream in self._streams:
                    self._streams.remove(stream)

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
                deliver([EtcdChange(kv.mod_revision, {_key(kv.key): kv.value}, _NONE)])
            else:
                deliver(_changes(found))

        self._add_watch(prefix, True, start_revision, on_response, deliver)

    def _add_watch(
        self,
        key: str,
        prefix: bool,
        start_revision: int,
        on_response: Callable[[Any], None],
        on_error: Callable[[HotknobError], None],
    ) -> WatchStream:
        """Open a watch of its own (``etcd_stream``); ``cancel`` it to end it.
        ``on_error`` gets the mapped reason the stream ended, unless it was cancelled."""
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
