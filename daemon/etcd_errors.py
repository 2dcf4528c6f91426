"""Client and gRPC errors from etcd, mapped into hotknob's error tree (``map_error``).

Every error the client library or gRPC raises for a call that ``EtcdStore`` makes, and
the reason a watch stream ended, comes here to become one of the ``HotknobError``
subclasses of ``etcd_types``, with one line that names etcd's endpoints and says what to
do where there is something to do (a user to give, a space quota to clear, a
transaction too large to split). The password never appears in a message.
"""

from __future__ import annotations

import contextlib
from typing import Any

import grpc
from pyetcd import exceptions as etcd_exc

from hotknob.config.errors import HotknobError, InvalidInput, Unavailable

from .etcd_stream import WatchCanceled
from .etcd_types import (
    AuthError,
    CompactedError,
    EtcdOptions,
    FutureRevisionError,
    NoSpaceError,
    TokenExpired,
    TooLargeError,
)

__all__ = ["map_error", "next_endpoint"]

# etcd's own refusals (UNAVAILABLE, "etcdserver: ...") when it cannot commit or confirm
# a read: what a member says when its cluster has lost its majority.
_NO_QUORUM = ("no leader", "request timed out", "unhealthy cluster")


def _rpc_error(exc: BaseException) -> grpc.RpcError | None:
    """The gRPC error behind ``exc``; the client re-raises its own types from inside it."""
    for candidate in (exc, exc.__context__, exc.__cause__):
        if isinstance(candidate, grpc.RpcError):
            return candidate
    return None


def next_endpoint(client: Any) -> None:
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
    from_etcd = details.startswith("etcdserver: ")  # etcd answered, and said why not
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
    elif (
        isinstance(exc, etcd_exc.ConnectionTimeoutError | etcd_exc.WatchTimedOut)
        or code == grpc.StatusCode.DEADLINE_EXCEEDED
        # The same deadline, when etcd's side of the call ends it before the client's
        # does and answers in Go's words.
        or (code == grpc.StatusCode.UNKNOWN and details == "context deadline exceeded")
    ):
        reason = f"no answer within {options.timeout:g}s"
    elif code == grpc.StatusCode.UNAVAILABLE and from_etcd:
        # Not "connection failed": the member took the call and refused it, and with a
        # cluster that lost its majority the fault lies with the other members.
        reason = f"the member could not serve it: {details}"
        if details.startswith(_NO_QUORUM):
            reason += " (a majority of etcd's members must be up and reach each other)"
    elif isinstance(exc, etcd_exc.ConnectionFailedError) or code == grpc.StatusCode.UNAVAILABLE:
        reason = f"connection failed ({details})" if details else "connection failed"
    elif code == grpc.StatusCode.CANCELLED:
        reason = "request cancelled (client closed)"
    else:
        reason = details or type(exc).__name__
    return Unavailable(f"cannot reach etcd at {where} ({what}): {reason}")
