"""From the etcd client's watch thread to the event loop: every change, in order, in groups.

The watch thread ``put``s each change (an ``EtcdChange``) or full read (``(kvs,
revision)``) into one queue; the loop drains it. Guarantees:

- items reach ``on_changes`` / ``on_snapshot`` in the order they were put, each once;
- a run of changes queued together goes to ``on_changes`` as one iterable (a group
  commit: the engine accepts each revision on its own but publishes once); a full read
  ends a run. Items the handler did not take (it raised) stay queued, in order;
- a change that comes alone is handed over at once; under a burst a drain runs at most
  every ``drain_every`` seconds, takes at most ``group_commit`` seconds of work, and
  costs the watch thread one wake-up of the loop, not one per revision;
- with an ``inline`` handler, a change that comes alone (nothing queued, nothing handed
  over in the last ``drain_every`` seconds) is offered to it on the watch thread itself,
  with no hand-over to the loop at all; one it declines (returns False) is queued as
  usual, first in line. The handler is serialized with the loop's handlers by its owner.

Why inline: on a machine whose idle CPUs sleep, every thread woken costs a wake-up
and runs its first code slowly; the watch thread is already running when a change
arrives. Measured in ``docs/performance-history.md`` (fourth round): the lone change
reaches clients ~0.2 ms sooner.

The spacing matters under a burst: the watch thread needs the interpreter lock to read
the watch stream, and a loop that took each revision as it came would hold the lock
nearly all the time, so that the stream, not the daemon, fell behind
(docs/performance-history.md, third round).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping

from .etcd_types import EtcdChange
from .throttle import Throttle

GROUP_COMMIT_S = 0.005
DRAIN_EVERY_S = 0.005

FullRead = tuple[Mapping[str, bytes], int]
Guard = Callable[[Callable[..., None], tuple[object, ...]], None]


def _call(fn: Callable[..., None], args: tuple[object, ...]) -> None:
    fn(*args)


class EtcdFeed:
    """``put`` from any thread; the handlers run on the loop that ``post`` hands calls to.

    ``post(fn)`` must run ``fn()`` on the loop soon (thread-safe). ``guard(fn, args)``
    runs a handler; the daemon's logs and swallows what it raises, so that one bad
    group does not stop the feed.
    """

    def __init__(
        self,
        post: Callable[[Callable[[], None]], None],
        on_changes: Callable[[Iterable[EtcdChange]], None],
        on_snapshot: Callable[[Mapping[str, bytes], int], None],
        *,
        guard: Guard = _call,
        inline: Callable[[EtcdChange], bool] | None = None,
        drain_every: float = DRAIN_EVERY_S,
        group_commit: float = GROUP_COMMIT_S,
    ) -> None:
        self._post = post
        self._on_changes = on_changes
        self._on_snapshot = on_snapshot
        self._guard = guard
        self._inline = inline
        self._drain_every = drain_every
        self._group_commit = group_commit
        self._inbox: deque[EtcdChange | FullRead] = deque()
        self._lock = threading.Lock()
        self._posted = False  # a drain is posted or scheduled, or a change is being handled
        self._handed_at = float("-inf")  # when a change was last handed over
        self._drain_soon = Throttle(drain_every, self._drain)

    def put(self, item: EtcdChange | FullRead) -> None:
        """Queue a change or a full read (on the watch thread); never blocks on the loop.

        A lone change may be handled right here by the ``inline`` handler."""
        with self._lock:
            lone = (
                self._inline is not None
                and not self._posted
                and isinstance(item, EtcdChange)
                and time.monotonic() - self._handed_at >= self._drain_every
            )
            if not lone:
                self._inbox.append(item)
            if self._posted:
                return
            self._posted = True
        if not lone:
            self._post(self._drain_soon)
            return
        assert self._inline is not None and isinstance(item, EtcdChange)
        taken = True  # one that raised was handed over: it is not handed over twice
        try:
            taken = self._inline(item)
        finally:  # even if it raised: what was queued meanwhile must not wait for ever
            with self._lock:
                self._handed_at = time.monotonic()
                if not taken:
                    self._inbox.appendleft(item)
                queued = bool(self._inbox)
                self._posted = queued
            if queued:
                self._post(self._drain_soon)

    def cancel(self) -> None:
        """Drop a scheduled drain (at stop; loop thread). Queued items are not handed over."""
        self._drain_soon.cancel()

    def _drain(self) -> None:
        deadline = time.monotonic() + self._group_commit
        while time.monotonic() < deadline:
            item = self._next()
            if item is None:
                return
            if isinstance(item, EtcdChange):
                self._guard(self._on_changes, (self._run(item, deadline),))
            else:
                self._guard(self._on_snapshot, item)
        with self._lock:
            if not self._inbox:
                self._posted = False
                return
        # More is queued: after whatever else waits on the loop, and not before
        # ``drain_every`` has passed since this drain began.
        asyncio.get_running_loop().call_soon(self._drain_soon)

    def _next(self) -> EtcdChange | FullRead | None:
        with self._lock:
            if self._inbox:
                self._handed_at = time.monotonic()
                return self._inbox.popleft()
            self._posted = False
            return None

    def _run(self, first: EtcdChange, deadline: float) -> Iterator[EtcdChange]:
        """``first`` and the changes queued behind it, up to a full read or ``deadline``;
        taken from the queue one at a time, as the handler asks for them."""
        yield first
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inbox or not isinstance(self._inbox[0], EtcdChange):
                    return
                self._handed_at = time.monotonic()
                change = self._inbox.popleft()
            assert isinstance(change, EtcdChange)
            yield change
