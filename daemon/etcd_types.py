"""The etcd adapter's vocabulary: connection options, typed errors, and changes.

Nothing here calls the client library; ``etcd_store`` does, and imports these.
Kept apart so that the adapter module holds only the calls, and so that
options and errors can be used without touching a connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hotknob.config.errors import HotknobError, InvalidInput, Unavailable, UsageError

DEFAULT_PORT = 2379
# etcd answers client pings more often than every 5 s with GOAWAY "too_many_pings".
MIN_KEEPALIVE_S = 5.0


class AuthError(HotknobError):
    """etcd refused the credentials, or the user lacks permission for the operation."""

    exit_code = 1


class CompactedError(HotknobError):
    """The revision asked for is older than etcd's compaction point.

    ``compact_revision`` is the oldest revision still readable when etcd says so (a
    watch does), else ``None`` (a read at a revision does not).
    """

    exit_code = 1

    def __init__(self, message: str, compact_revision: int | None = None) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class ConflictError(HotknobError):
    """A compare in ``commit`` failed, so nothing was written.

    ``current`` maps each key whose mod revision differed from the expectation to its
    mod revision now (0: the key does not exist).
    """

    exit_code = 1

    def __init__(self, current: Mapping[str, int]) -> None:
        self.current = dict(current)
        detail = ", ".join(f"{k} is at revision {r}" for k, r in sorted(self.current.items()))
        super().__init__(f"etcd keys changed concurrently ({detail or 'unknown keys'})")


class TokenExpired(AuthError):
    """An auth token etcd no longer accepts; the caller authenticates again and retries."""


class FutureRevisionError(InvalidInput):
    """A read asked for a revision etcd has not reached.

    For a watcher that resumes, this means etcd went back: restored from a backup, or
    replaced by a newer cluster.
    """


class TooLargeError(Unavailable):
    """A message from etcd was over the client's receive limit (gRPC RESOURCE_EXHAUSTED).

    A watch catch-up that hits it is not retried as is (it would fail the same way): the
    watcher reads the prefix again instead, which is one current state, not every
    revision missed.
    """


@dataclass(frozen=True)
class EtcdOptions:
    """How to reach etcd. ``password`` is left out of the repr, and of every message."""

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_cert: str | None = None
    cert_cert: str | None = None
    cert_key: str | None = None
    timeout: float = 5.0
    time_retry: float = 1.0
    keepalive_time: float = MIN_KEEPALIVE_S
    keepalive_timeout: float = 3.0
    # The largest message taken from etcd, in bytes. gRPC's own default (4 MiB) is below
    # what etcd sends in one watch catch-up or one range read of a prefix that holds a
    # few large values, so it is raised; a watch still over it falls back to a full read.
    # Not -1 (no limit): measured alternated, that setting made every lone change
    # ~40 us slower to arrive, where 64 MiB costs nothing measurable. A test sets a
    # small one.
    max_receive_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise UsageError("no etcd endpoints given")
        for text in self.endpoints:
            parse_endpoint(text)
        if (self.user is None) != (self.password is None):
            raise UsageError("etcd auth needs both a user and a password")

    @classmethod
    def from_strings(
        cls,
        endpoints_csv: str,
        *,
        user: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        cert_cert: str | None = None,
        cert_key: str | None = None,
        timeout: float = 5.0,
        time_retry: float = 1.0,
    ) -> EtcdOptions:
        """Options from a comma-separated endpoint list, as given on a command line."""
        endpoints = tuple(part.strip() for part in endpoints_csv.split(",") if part.strip())
        return cls(
            endpoints=endpoints,
            user=user or None,
            password=password or None,
            ca_cert=ca_cert or None,
            cert_cert=cert_cert or None,
            cert_key=cert_key or None,
            timeout=timeout,
            time_retry=time_retry,
        )

    def describe(self) -> str:
        """The endpoints, for messages: ``127.0.0.1:2379,10.0.0.2:2379``."""
        return ",".join(self.endpoints)

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None or self.cert_cert is not None


def parse_endpoint(text: str) -> tuple[str, int, bool | None]:
    """``host:port``, ``http://host:port`` or ``https://host:port`` → (host, port, secure).

    ``secure`` is ``None`` when no scheme says so (TLS options then decide). IPv6 hosts
    are written in brackets: ``[::1]:2379``.
    """
    rest, secure = text.strip(), None
    for scheme, is_secure in (("http://", False), ("https://", True)):
        if rest.lower().startswith(scheme):
            rest, secure = rest[len(scheme) :], is_secure
    rest = rest.rstrip("/")
    host, port_text = rest, ""
    if rest.startswith("["):
        host, _, after = rest[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else after
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        port = -1
    if not host or "/" in rest or not 0 < port < 65536:
        raise UsageError(
            f"malformed etcd endpoint {text!r} (want host:port or http(s)://host:port)"
        )
    return host, port, secure


@dataclass(frozen=True)
class EtcdChange:
    """All events of one etcd revision under a prefix: one transaction is one change."""

    revision: int
    puts: Mapping[str, bytes]
    deletes: frozenset[str]


@dataclass(frozen=True)
class HistoryEntry:
    """One key's state as changed at ``revision``; ``value`` is ``None`` for a delete."""

    key: str
    value: bytes | None
    revision: int


@dataclass(frozen=True)
class History:
    """Entries newest first. ``reached_compaction``: older history was compacted away."""

    entries: list[HistoryEntry]
    reached_compaction: bool


def group_by_revision(events: Iterable[tuple[int, str, bytes | None]]) -> list[EtcdChange]:
    """(revision, key, value or None for a delete) events → one ``EtcdChange`` per revision.

    A watch response can hold several revisions (a catch-up after a reconnect); within
    one revision a later event for the same key wins. Order of revisions is kept.
    """
    grouped: dict[int, tuple[dict[str, bytes], set[str]]] = {}
    for revision, key, value in events:
        puts, deletes = grouped.setdefault(revision, ({}, set()))
        if value is None:
            puts.pop(key, None)
            deletes.add(key)
        else:
            deletes.discard(key)
            puts[key] = value
    return [
        EtcdChange(revision, puts, frozenset(deletes))
        for revision, (puts, deletes) in sorted(grouped.items())
    ]
