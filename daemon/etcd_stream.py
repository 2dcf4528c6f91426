"""One etcd watch on a gRPC stream of its own, read on a thread of its own.

The client library's watcher carries every watch of a client on one two-way stream,
which gRPC reads on a thread of its own and hands to the library's watch thread, and
passes each response through its own bookkeeping (a lock, the watch id's callback, its
event classes) before a callback sees it. Here the watch is etcd's ``Watch`` called as
a one-request stream (``ClosableClient.start_watch``, with the library's ``etcdrpc``
messages), on a channel whose ``SingleThreadedUnaryStream`` option lets this thread
take each raw ``WatchResponse`` from gRPC itself: put -> callback ~90 us sooner at p50
than the library's watcher, measured in the same run (``docs/performance-history.md``,
twentieth round).

A stream here also says why etcd cancelled it (``WatchCanceled``: a permission denied,
a compacted revision), which the library's watcher drops: its watch then waits forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc
from pyetcd.etcdrpc import kv_pb2

from .etcd_types import EtcdChange, group_by_revision

_DELETE = kv_pb2.Event.DELETE


class WatchCanceled(Exception):
    """etcd cancelled a watch and said why (``cancel_reason``)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason or "cancelled by etcd"
        super().__init__(self.reason)


def key_text(raw: bytes) -> str:
    """An etcd key as text; bytes that are not UTF-8 kept as surrogates, not refused."""
    return raw.decode("utf-8", errors="surrogateescape")


def response_changes(events: Any) -> list[EtcdChange]:
    """A watch response's events (``mvccpb.Event``), one change per revision."""
    return group_by_revision(
        (e.kv.mod_revision, key_text(e.kv.key), None if e.type == _DELETE else e.kv.value)
        for e in events
    )


def watch_request(key: str, range_end: bytes | None, start_revision: int) -> Any:
    """The request that creates a watch of ``key`` (to ``range_end``, if a prefix)."""
    create = etcdrpc.WatchCreateRequest(key=key.encode("utf-8", errors="surrogateescape"))
    if range_end is not None:
        create.range_end = range_end
    if start_revision > 0:
        create.start_revision = start_revision
    return etcdrpc.WatchRequest(create_request=create)


class WatchStream:
    """A watch of its own: ``open`` it on a client; the callbacks run on its thread.

    ``on_response`` gets each ``WatchResponse`` that carries events or is a progress
    notice. ``on_end`` gets, once, why the stream ended: an exception
    (``WatchCanceled``, ``RevisionCompactedError``, a ``grpc.RpcError``) or None (etcd
    ended it without a reason); not after ``cancel``, nor when ``open`` raised it.
    """

    def __init__(
        self,
        request: Any,
        on_response: Callable[[Any], None],
        on_end: Callable[[BaseException | None], None],
        name: str,
    ) -> None:
        self._request = request
        self._on_response = on_response
        self._on_end = on_end
        self._name = name
        self._created = threading.Event()
        self._error: BaseException | None = None
        self._cancelled = False
        self._call: Any = None
        self._thread: threading.Thread | None = None

    def open(self, start_call: Callable[[Any], Any], timeout: float | None) -> None:
        """Start the call (``start_call(request)`` returns it) and wait for etcd to create
        the watch; raise what refused it, or ``WatchTimedOut``."""
        call = self._call = start_call(self._request)
        if self._cancelled:  # ``cancel`` came while the call was being made
            call.cancel()
        thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        thread.start()
        self._thread = thread  # only now: ``join`` from another thread needs it started
        if not self._created.wait(timeout):
            self.cancel()
            raise etcd_exc.WatchTimedOut()
        if self._error is not None:
            self.cancel()
            raise self._error

    def cancel(self) -> None:
        """End the stream; the callbacks get nothing more. Idempotent."""
        self._cancelled = True
        call = self._call
        if call is not None:
            call.cancel()

    def join(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        end: BaseException | None = None
        created = False
        try:
            for response in self._call:
                if response.compact_revision:
                    end = etcd_exc.RevisionCompactedError(response.compact_revision)
                    break
                if response.canceled:
                    end = WatchCanceled(response.cancel_reason)
                    break
                if not created:  # the first response: etcd created the watch
                    created = True
                    self._created.set()
                    if not response.events:
                        continue
                if self._cancelled:
                    return
                self._on_response(response)
        except Exception as exc:  # a gRPC error, or a surprise: either ends the stream
            end = exc
        if not created:  # ``open`` is waiting: it raises this
            self._error = end or etcd_exc.ConnectionFailedError()
            self._created.set()
        elif not self._cancelled:
            self._on_end(end)
