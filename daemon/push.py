"""What the engine publishes, on its way to the clients: the push and its throttle.

A change that comes alone is pushed at once; in a burst, clients get at most one update
per ``every`` seconds (newest wins), so that decoding, applying and acknowledging every
revision does not take the CPU the daemon needs to keep up. The engine publishes on the
event loop, or on the etcd watch thread for a change that comes alone
(``EtcdIntake._take_inline``): there the push is made at once, on that thread, and
events for ``watch`` clients are handed to the loop, which alone sends them.

Each push also records the etcd revision its configuration was built at, by version,
before the clients can acknowledge it: the daemon answers from it which revision a
process runs.

It is apart from the daemon because it is one job with its own state (the state due, the
throttle, the record of versions), used under the daemon's lock; the daemon only says
whether the running thread is the loop and hands it the socket server once it exists.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .metrics import Metrics
from .published import Published
from .socket_server import SocketServer
from .throttle import Throttle

BUILT_AT_KEPT = 1024
"""How many pushed versions ``built_at`` keeps the revision of (the newest)."""


class Pusher:
    """``publish`` and ``broadcast`` from the loop or the watch thread. ``on_loop()`` says
    whether the running thread is the loop; ``post(fn, *args)`` runs ``fn(*args)`` on the
    loop soon; ``lock`` is the daemon's (the engine and the push state). Nothing is sent
    before ``server`` is set."""

    def __init__(
        self,
        every: float,
        *,
        lock: threading.RLock,
        on_loop: Callable[[], bool],
        post: Callable[..., None],
        metrics: Metrics,
    ) -> None:
        self._lock = lock
        self._on_loop = on_loop
        self._post = post
        self._metrics = metrics
        self.server: SocketServer | None = None
        # The etcd revision each pushed version was built at, the newest kept.
        self.built_at: OrderedDict[int, int] = OrderedDict()
        self.due: Published | None = None
        self.soon = Throttle(every, self.push)

    def publish(self, published: Published) -> None:
        """Push ``published`` to the clients, now or within ``every`` (newest wins).

        On the watch thread (a lone change, ``_take_inline``), now: the push throttle
        was idle, and it counts this push."""
        self.due = published
        if self._on_loop():
            self.soon()
        else:
            self.soon.ran()
            self.push()

    def broadcast(self, event: dict[str, Any]) -> None:
        """An event for ``watch`` clients; sent from the loop, whichever thread has it. The
        watch thread (a lone change) wakes the loop for it only if a client watches: that
        wake-up would come just as the clients apply the change, on the same CPUs."""
        assert self.server is not None
        if self._on_loop():
            self.server.broadcast_event(event)
        elif self.server.has_watchers:
            self._post(self.server.broadcast_event, event)

    def push(self) -> None:
        with self._lock:
            published, self.due = self.due, None
            if published is None:
                return
            # Before the push: a client's ack can come back before ``publish`` returns.
            self.built_at[published.version] = published.revision
            while len(self.built_at) > BUILT_AT_KEPT:
                self.built_at.popitem(last=False)
            if self.server is not None:
                self.server.publish(published)
            self._metrics.version.set(published.version)
