"""The etcd client the adapter (``etcd_store``) builds: the library's, made safe to close
from another thread.

The library makes each gRPC stub on first use, from the channel, and again after a
failover. gRPC crashes the whole process (a segmentation fault, not an exception) when a
stub is made from a channel another thread has just closed. A daemon stopped while its
start still waited for an unreachable etcd did so, now and then: the watch thread made
its first stub as the stop closed the client. Here making a stub and closing the client
exclude each other, and a stub asked for after the close raises the library's
``ConnectionFailedError`` (``Unavailable`` to the adapter). Calls already made are
cancelled by the close, as gRPC does safely.
"""

from __future__ import annotations

import threading
from typing import Any

import pyetcd
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

    def get_watcher(self) -> Any:
        with self._closing:
            if self._closed:
                raise etcd_exc.ConnectionFailedError("the etcd client is closed")
            return super().get_watcher()

    def close(self) -> None:
        with self._closing:
            self._closed = True
            super().close()
