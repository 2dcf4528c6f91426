"""The etcd client the adapter (``etcd_store``) builds: the library's, made safe to close
from another thread.

The library makes each gRPC stub on first use, from the channel, and again after a
failover. gRPC crashes the whole process (a segmentation fault, not an exception) when a
stub is made from a channel another thread has just closed. A daemon stopped while its
start still waited for an unreachable etcd did so, now and then: the watch thread made
its first stub as the stop closed the client. Here making a stub and closing the client
exclude each other, and a stub asked for after the close raises the library's
``ConnectionFailedError`` (``Unavailable`` to the adapter). Calls already made are
cancelled by the close, as gRPC does safely. The watches (``start_watch``: the adapter
reads them itself, not through the library's watcher) are made the same way.
"""

from __future__ import annotations

import threading
from typing import Any

import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc


def _guarded(name: str) -> property:
    made_by = getattr(pyetcd.MultiEndpointEtcd3Client, name)

    def get(self: ClosableClient) -> Any:
        with self._closing:
            if self._closed:
                raise etcd_exc.ConnectionFailedError("the etcd client is closed")
            return made_by.fget(self)

    return property(get)


class ClosableClient(pyetcd.MultiEndpointEtcd3Client):
    """``MultiEndpointEtcd3Client`` whose stubs are never made from a closed channel."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the library's own start: with credentials it authenticates at once.
        self._closing = threading.RLock()
        self._closed = False
        super().__init__(*args, **kwargs)

    authstub = _guarded("authstub")
    kvstub = _guarded("kvstub")
    clusterstub = _guarded("clusterstub")
    leasestub = _guarded("leasestub")
    maintenancestub = _guarded("maintenancestub")

    def start_watch(self, request: Any) -> Any:
        """A watch call on the channel in use, with the client's token: ``WatchStream``
        reads it. etcd's ``Watch`` is a two-way stream; called here as a one-request
        stream (the request, then the client's half of the stream closed, which etcd
        takes as no more requests, keeping the watch), so that with the channel's
        ``SingleThreadedUnaryStream`` option the thread that reads the responses takes
        them from gRPC itself, with no hand-over from gRPC's own thread on the way."""
        with self._closing:
            if self._closed:
                raise etcd_exc.ConnectionFailedError("the etcd client is closed")
            call = self._stubs.get("watch")
            if call is None:
                call = self._stubs["watch"] = self.channel.unary_stream(
                    "/etcdserverpb.Watch/Watch",
                    request_serializer=etcdrpc.WatchRequest.SerializeToString,
                    response_deserializer=etcdrpc.WatchResponse.FromString,
                )
            return call(request, credentials=self.call_credentials, metadata=self.metadata)

    def close(self) -> None:
        with self._closing:
            self._closed = True
            super().close()
