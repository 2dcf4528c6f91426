"""The etcd adapter's vocabulary: connection options, typed errors, and changes.

Nothing here calls the client library; ``etcd_store`` does, and imports these.
Kept apart so that the adapter module holds only the calls, and so that
options and errors can be used without touching a connection.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from hotknob.config.errors import HotknobError, InvalidInput, Unavailable, UsageError

DEFAULT_PORT = 2379
# etcd answers client pings more often than every 5 s with GOAWAY "too_many_pings".
MIN_KEEPALIVE_S = 5.0
# The longest time limit of one etcd call: an hour is past any answer worth waiting for,
# and far below what a thread's wait takes (a wait of 1e10 s raises OverflowError).
MAX_TIMEOUT_S = 3600.0


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


class NoSpaceError(Unavailable):
    """etcd is out of space (its NOSPACE alarm: ``mvcc: database space exceeded``).

    etcd keeps every revision until its history is compacted; past its backend quota
    (2 GiB by default) it refuses every write, ours and everyone's, until an operator
    compacts, defragments and disarms the alarm. Not our fault to fix, nor the caller's:
    retryable like an unreachable etcd, with a message that says what to do.
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
        if (self.cert_cert is None) != (self.cert_key is None):
            raise UsageError(
                "etcd TLS needs both a client certificate and its key (--etcd-cert and "
                "--etcd-key), or neither"
            )
        why = timeout_problem(self.timeout)
        if why is not None:
            raise UsageError(f"etcd timeout (--etcd-timeout) {why}")

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

    def check_tls_files(self) -> None:
        """Refuse TLS files that cannot work, with a ``UsageError`` naming the file: one
        that cannot be read, a CA or client certificate file that holds no PEM
        certificate, a key that is not a PEM private key without a passphrase, or one
        that does not match the client certificate.

        gRPC would find out only as it connects, again on every try, and tell it in lines
        of its own on stderr; its error then says only that etcd cannot be reached. Each
        file is loaded here as gRPC loads it, with the ``ssl`` module, on no security
        policy of its own (level 0: a weak key is for the server to refuse, not us).
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        if self.ca_cert is not None:
            _load_tls_file(
                "CA certificate (--etcd-ca)",
                self.ca_cert,
                lambda: context.load_verify_locations(cafile=self.ca_cert),
            )
        if self.cert_cert is None or self.cert_key is None:
            return
        cert, key = self.cert_cert, self.cert_key
        _load_tls_file(
            "client certificate (--etcd-cert)",
            cert,
            lambda: context.load_verify_locations(cafile=cert),
        )

        def encrypted() -> bytes:
            raise UsageError(
                f"etcd client key (--etcd-key) {key} is encrypted: gRPC takes no passphrase, "
                "give the key unencrypted"
            )

        _load_tls_file(
            "client key (--etcd-key)",
            key,
            lambda: context.load_cert_chain(cert, key, password=encrypted),
            mismatch=f"does not match the client certificate (--etcd-cert) {cert}",
        )

    def checked_tls_bytes(self) -> tuple[bytes, bytes | None, bytes | None]:
        """The CA certificate, client key and client certificate files' bytes (None for a
        file not given), as ``check_tls_files`` took them: read before the check and after
        it, and the check made again until both reads agree. gRPC takes these bytes, not the
        files: a file replaced between the check and gRPC's own read (a certificate renewed
        while the daemon reconnects) would reach gRPC unchecked, and it would say so only
        on stderr, at each try. ``UsageError`` if a file cannot be read, does not load, or
        keeps changing (``TLS_READS`` checks)."""
        assert self.ca_cert is not None
        before = self._tls_bytes()
        for _ in range(TLS_READS):
            self.check_tls_files()
            after = self._tls_bytes()
            if after == before:
                return after
            before = after
        raise UsageError(
            f"etcd TLS files keep changing while read ({TLS_READS} checks): "
            f"{', '.join(p for p in (self.ca_cert, self.cert_key, self.cert_cert) if p)}"
        )

    def _tls_bytes(self) -> tuple[bytes, bytes | None, bytes | None]:
        assert self.ca_cert is not None
        return (
            _read_tls("CA certificate (--etcd-ca)", self.ca_cert),
            None if self.cert_key is None else _read_tls("client key (--etcd-key)", self.cert_key),
            None
            if self.cert_cert is None
            else _read_tls("client certificate (--etcd-cert)", self.cert_cert),
        )


TLS_READS = 3
"""How many times ``checked_tls_bytes`` checks files that change under it before it gives
up: a renewal writes each file once."""


def _read_tls(what: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise UsageError(f"cannot read etcd {what} {path}: {exc.strerror or exc}") from exc


def timeout_problem(seconds: float) -> str | None:
    """Why ``seconds`` cannot be the time limit of one etcd call, or ``None``.

    0 or less, ``nan`` and ``inf`` (gRPC takes no endless deadline) each make every
    call fail at once, which would read as an etcd that cannot be reached."""
    if 0 < seconds <= MAX_TIMEOUT_S:  # nan is neither
        return None
    return f"must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}, not {seconds:g}"


def _load_tls_file(
    what: str, path: str, load: Callable[[], None], *, mismatch: str | None = None
) -> None:
    """Run ``load``; a file it cannot take is a ``UsageError`` naming ``what`` and ``path``."""
    try:
        load()
    except OSError as exc:
        if not isinstance(exc, ssl.SSLError):
            reason = exc.strerror or str(exc)
            raise UsageError(f"cannot read etcd {what} {path}: {reason}") from exc
        if mismatch is not None and exc.reason == "KEY_VALUES_MISMATCH":
            raise UsageError(f"etcd {what} {path} {mismatch}") from exc
        kind = "private key" if mismatch is not None else "certificate"
        detail = f" ({exc.reason})" if exc.reason else ""
        raise UsageError(f"etcd {what} {path} holds no PEM {kind} that loads{detail}") from exc


_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_.])?")  # a name or IPv4
_ENDPOINT_FORMS = "want host:port, [ipv6]:port or http(s)://host:port"


def parse_endpoint(text: str) -> tuple[str, int, bool | None]:
    """``host:port``, ``http://host:port`` or ``https://host:port`` → (host, port, secure).

    ``secure`` is ``None`` when no scheme says so (TLS options then decide). The port
    may be left out (2379). The host is a name or an IPv4 address; an IPv6 address is
    written in brackets: ``[::1]:2379``. Anything else (``host:port:extra``, a port
    that is not a number from 1 to 65535, an empty host, ``::::``) is a ``UsageError``.
    """

    def malformed(why: str) -> UsageError:
        return UsageError(f"malformed etcd endpoint {text!r}: {why} ({_ENDPOINT_FORMS})")

    rest, secure = text.strip(), None
    for scheme, is_secure in (("http://", False), ("https://", True)):
        if rest.lower().startswith(scheme):
            rest, secure = rest[len(scheme) :], is_secure
            break
    if rest.endswith("/"):  # http://host:port/, as a URL is often written
        rest = rest[:-1]
    if rest.startswith("["):
        host, closed, after = rest[1:].partition("]")
        if not closed:
            raise malformed("no ']' after the IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise malformed(f"{host!r} is not an IPv6 address") from None
        if after and not after.startswith(":"):
            raise malformed(f"{after!r} after the address")
        port_text = after[1:] if after else None
    else:
        if rest.count(":") > 1:
            try:
                ipaddress.IPv6Address(rest)
            except ValueError:
                raise malformed("more than one ':'") from None
            raise malformed("an IPv6 address needs brackets, as in [::1]:2379")
        host, colon, port_text_ = rest.partition(":")
        port_text = port_text_ if colon else None
        if not host:
            raise malformed("no host")
        if not _HOST_NAME.fullmatch(host):
            raise malformed(f"{host!r} is not a host name or address")
    if port_text is None:
        port = DEFAULT_PORT
    elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise malformed(f"the port {port_text!r} is not a number from 1 to 65535")
    return host, port, secure


class PrefixState(NamedTuple):
    """A prefix as read at one revision: each key's value and the revision that last
    changed it, the revision the read is consistent at, and the id of the etcd cluster
    that answered (the same for every member of one cluster)."""

    values: dict[str, bytes]
    mods: dict[str, int]
    revision: int
    cluster_id: int


class EtcdChange(NamedTuple):
    """All events of one etcd revision under a prefix: one transaction is one change.

    A named tuple, not a frozen dataclass: one is made for each change on the watch's
    thread before anything else, where a tuple's construction is the cheaper."""

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
