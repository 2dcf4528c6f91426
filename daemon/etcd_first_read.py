"""The watcher's first full read of its prefix, raced across the etcd endpoints
(``FirstRead``).

Tried one after the other, one hung member (its sockets open, nothing answered) would
hold the read for ``options.timeout`` before the next endpoint is asked: longer than a
daemon waits for etcd at its start, so it would start without etcd's values although
another member answers at once. So the next endpoint is asked as soon as one fails, or
when none has answered within ``next_after`` seconds, while the earlier reads go on;
healthy endpoints answer well within that, so the first in the list is the one used, as
before. An endpoint that failed is asked again every ``next_after`` seconds while one
that has not failed yet is still out (for up to ``options.timeout``): the survivors of a
hung leader refuse reads until they have elected another, which takes a second or two.
It is asked again with a new store: the client library keeps an endpoint that failed out
of use for ``options.time_retry`` seconds, so the failed store would refuse at once,
asking nothing, and its refusal ("all failed recently") would replace the reason the
endpoint failed.

Apart from the watcher (``etcd_watcher``) because it is the one place the watcher reads
from several endpoints at once, with threads and stores of its own that only this race
uses; the watcher starts it once, before its first watch, and ``stop`` closes what it
holds (``close``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from hotknob.config.errors import HotknobError

from .etcd_store import EtcdOptions, EtcdStore, PrefixState

__all__ = ["FirstRead"]


def _close_soon(stores: list[EtcdStore]) -> None:
    """Close ``stores`` on a thread of their own: a store still logging in holds its lock
    until that ends, and the caller must not wait for it."""
    if not stores:
        return

    def close() -> None:
        for store in stores:
            store.close()

    threading.Thread(target=close, name="hotknob-etcd-close", daemon=True).start()


class FirstRead:
    """One race of reads of ``prefix``, a store for each endpoint (``new_store``); ``read``
    runs it, on its caller's thread, until an answer or ``stopping``."""

    def __init__(
        self,
        options: EtcdOptions,
        prefix: str,
        new_store: Callable[[str], EtcdStore],
        stopping: threading.Event,
        *,
        next_after: float,
        name: str,
    ) -> None:
        self.options = options
        self.prefix = prefix
        self._new_store = new_store
        self._stopping = stopping
        self._next_after = next_after
        self._name = name
        self._lock = threading.Lock()
        # The stores of the race under way (``close`` closes them); none once it is over.
        self._stores = [new_store(endpoint) for endpoint in options.endpoints]

    def close(self) -> None:
        """Close the stores still reading, which ends their reads (the watcher's ``stop``)."""
        with self._lock:
            stores = list(self._stores)
        _close_soon(stores)

    def read(self) -> tuple[int, EtcdStore, PrefixState]:
        """The first answer, from the endpoints in overlapping turns.

        Returns the index of the endpoint that answered, its store (kept, to watch on)
        and what it read. The other stores are closed, which ends their reads. When
        none answers, raises the error of the first endpoint in the list.
        """
        endpoints = self.options.endpoints
        stores = self._stores
        results: queue.SimpleQueue[tuple[int, PrefixState | HotknobError]] = queue.SimpleQueue()

        def read_on(index: int) -> None:
            got: PrefixState | HotknobError
            try:
                got = stores[index].read_prefix_state(self.prefix)
            except HotknobError as exc:
                got = exc
            except Exception as exc:  # the race must hear from every reader
                got = HotknobError(f"etcd read {self.prefix} on {endpoints[index]}: {exc!r}")
            results.put((index, got))

        out: set[int] = set()  # endpoints with a read under way
        again: dict[int, float] = {}  # endpoints that failed: when to ask them again
        errors: dict[int, HotknobError] = {}
        asked = 0  # endpoints asked at least once (the first ``asked`` of the list)
        began = last_new = time.monotonic()

        def ask(index: int) -> None:
            if index in errors:
                with self._lock:  # ``close`` closes what ``_stores`` holds
                    spent, stores[index] = stores[index], self._new_store(endpoints[index])
                _close_soon([spent])
            out.add(index)
            name = f"{self._name}-read-{index}"
            threading.Thread(target=read_on, args=(index,), name=name, daemon=True).start()

        winner: tuple[int, PrefixState] | None = None
        try:
            ask(0)
            asked = 1
            while winner is None and (out or again) and not self._stopping.is_set():
                now = time.monotonic()
                for index in [i for i, at in again.items() if at <= now]:
                    del again[index]
                    ask(index)
                wake = [*again.values()]
                if asked < len(stores):
                    wake.append(last_new + self._next_after)
                try:
                    index, got = results.get(timeout=max(0.0, min(wake) - now) if wake else None)
                except queue.Empty:
                    if asked < len(stores) and time.monotonic() >= last_new + self._next_after:
                        ask(asked)
                        asked, last_new = asked + 1, time.monotonic()
                    continue
                out.discard(index)
                if not isinstance(got, HotknobError):
                    winner = (index, got)
                    break
                errors[index] = got
                if asked < len(stores):
                    ask(asked)
                    asked, last_new = asked + 1, time.monotonic()
                # Asked again only while an endpoint that has not failed yet is still
                # out (it may be hung): with every endpoint down, the race ends at once.
                fresh_out = any(i not in errors for i in out)
                if fresh_out and time.monotonic() - began < self.options.timeout:
                    again[index] = time.monotonic() + self._next_after
        finally:
            with self._lock:
                self._stores = []
            _close_soon([s for i, s in enumerate(stores) if winner is None or i != winner[0]])
        if winner is None:
            if not errors:
                raise HotknobError("stopping")
            raise errors[min(errors)]
        return winner[0], stores[winner[0]], winner[1]
