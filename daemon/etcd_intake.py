"""etcd's side of the daemon: from its watcher to the engine, and what etcd values it refuses.

The watcher reads the prefix at one revision and watches it from the next; its events
reach the engine here. The start waits for that first read (``start``), for at most the
daemon's ``etcd_start_timeout``; later full reads and groups of changes come on the loop
(``etcd_feed.EtcdFeed``), and a change that comes alone is validated, published and
written to the clients on the watch thread itself (``_take_inline``), under the daemon's
lock. After each, the config files refused beside an etcd value are offered again
(``FilesFeed.again``) and the guards whose keys were written hear of it. The keys of etcd
values this daemon refused are kept here (``refused``), in revision order within a group,
for the status entries and ``/healthz``; so is whether etcd is reached now.

It is apart from the daemon because none of it is the daemon's assembly or lifecycle, as
the config files' path is not (``files_feed.FilesFeed``): the daemon creates it, hands it
the engine and the guards once they exist, and opens the watch thread's way to the engine
once the start replayed what came early.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .context import Context
from .engine import Engine
from .etcd_feed import EtcdFeed
from .etcd_store import EtcdChange
from .etcd_watcher import EtcdWatcher
from .feedback import ClientFeedback
from .files_feed import FilesFeed
from .guards import GuardManager
from .held_tail import Dispatch, HeldTail
from .metrics import Metrics
from .push import Pusher
from .refused import RefusedKeys


class EtcdIntake:
    """etcd's events for the daemon's engine (none at all without ``ctx.etcd``).

    ``post(fn, *args)`` runs ``fn(*args)`` on the loop soon (thread-safe); ``dispatch(fn,
    args)`` runs a handler, logging what it raises; ``lock`` is the daemon's, held while
    the engine or the push state is used; ``started()`` says whether the daemon's start
    ended, and until it does a group of changes waits in ``early``, which the daemon
    replays in order with the other events that came early; ``stopping`` ends the start's
    wait for etcd. ``engine`` and ``guards`` are set by the daemon once they exist."""

    def __init__(
        self,
        ctx: Context,
        *,
        start_timeout: float,
        lock: threading.RLock,
        post: Callable[..., None],
        dispatch: Dispatch,
        pushes: Pusher,
        tail: HeldTail,
        files: FilesFeed,
        feedback: ClientFeedback,
        metrics: Metrics,
        started: Callable[[], bool],
        early: list[Callable[[], None]],
        stopping: asyncio.Event,
        log: Any,
    ) -> None:
        self._ctx = ctx
        self._start_timeout = start_timeout
        self._lock = lock
        self._post = post
        self._dispatch = dispatch
        self._pushes = pushes
        self._tail = tail
        self._files = files
        self._feedback = feedback
        self._metrics = metrics
        self._started = started
        self._early = early
        self._stopping = stopping
        self._log = log
        self.engine: Engine | None = None
        self.guards: GuardManager | None = None
        self.watcher: EtcdWatcher | None = None
        self._initial_etcd: tuple[Mapping[str, bytes], int] | None = None
        self._initial_event = asyncio.Event()
        self._inline_ok = False  # started, early events replayed, not stopping
        # Changes and full reads from the etcd watch thread, to the engine in group commits
        # (or, for a change that comes alone, on the watch thread itself).
        self._etcd_feed = EtcdFeed(
            self._post,
            self._on_etcd_changes,
            self._on_etcd_snapshot,
            guard=self._dispatch,
            inline=self._take_inline,
        )
        self._changes_inline = self._metrics.etcd_changes.labels("watch_thread")
        self._changes_in_loop = self._metrics.etcd_changes.labels("loop")
        self.refused = RefusedKeys(ctx.app)  # etcd values refused: under ``_lock``
        # A group's changes, those from ``_untaken_from`` on not taken yet: under ``_lock``.
        self._untaken: list[EtcdChange] = []
        self._untaken_from = 0
        self.connected = False
        # Set when the watcher reports etcd lost (also before the first connection, when
        # etcd is down at start): only coming back after that is a resume.
        self._etcd_lost = False

    async def start(self) -> tuple[Mapping[str, bytes] | None, int]:
        if self._ctx.etcd is None:
            self._log.info("etcd_disabled", reason="no --etcd-endpoints")
            return {}, 0
        self.watcher = EtcdWatcher(
            self._ctx.etcd,
            self._ctx.prefix,
            on_snapshot=lambda kvs, rev: self._etcd_feed.put((kvs, rev)),
            on_change=self._etcd_feed.put,
            on_connection=lambda up, detail: self._post(self._on_etcd_connection, up, detail),
        )
        self.watcher.start()
        # Until the first read, the timeout, or a stop asked for (then the start ends).
        waits = [asyncio.ensure_future(e.wait()) for e in (self._initial_event, self._stopping)]
        try:
            await asyncio.wait(
                waits, timeout=self._start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for wait in waits:
                wait.cancel()
        if self._stopping.is_set():
            return None, 0
        if self._initial_etcd is None:
            self._log.warning(
                "etcd_unavailable_at_start",
                endpoints=",".join(self._ctx.etcd.endpoints),
                waited_s=self._start_timeout,
            )
            return None, 0
        assert self._initial_etcd is not None
        kvs, revision = self._initial_etcd
        self._initial_etcd = None
        return kvs, revision

    def open_inline(self) -> None:
        """The daemon started and replayed what came early: a lone change may be taken on
        the watch thread from now on (``_take_inline``)."""
        self._inline_ok = True

    def close_inline(self) -> None:
        """The daemon stops: the watch thread takes no change itself any more."""
        self._inline_ok = False

    def cancel(self) -> None:
        """The daemon stops: what the watch thread queued is not handed to the engine."""
        self._etcd_feed.cancel()

    def _on_etcd_snapshot(self, kvs: Mapping[str, bytes], revision: int) -> None:
        if not self._started():
            self._initial_etcd = (kvs, revision)
            self._initial_event.set()
            return
        assert self.engine is not None
        with self._lock:
            before = self.refused.newest, self.refused.cleared
            # What the read refuses is said again as it is read, at its revision; the
            # refusals cleared before stay, unless the read is below them (a restore).
            self.refused.clear(revision)
            self.engine.on_etcd_snapshot(kvs, revision)
            if (self.refused.newest, self.refused.cleared) != before:
                self._post(self._feedback.refusals_changed)
            self._files.again()
        self._guarded_keys_read_again()

    def _on_etcd_changes(self, changes: Iterable[EtcdChange]) -> None:
        if not self._started():
            early = list(changes)
            self._early.append(lambda: self._on_etcd_changes(early))
            return
        assert self.engine is not None
        changes = list(changes)
        with self._lock:
            # A group's refusals are reported after its push, all of them, in order
            # (``on_rejected``): each takes the changes before it first (``_untaken``),
            # and the rest are taken here, after the engine had them.
            self._untaken, self._untaken_from = changes, 0
            try:
                self.engine.on_etcd_changes(_counted(changes, self._changes_in_loop))
                untaken = changes[self._untaken_from :]
            finally:
                self._untaken, self._untaken_from = [], 0
            self._took(untaken)
            self._files.again()
        self._guarded_keys_written(changes)

    def _guarded_keys_written(self, changes: list[EtcdChange]) -> None:
        """After etcd changes: a guard whose keys they wrote ends now (``on_config_changes``),
        on the loop. Nothing to do, at the cost of one look-up, while no guard is armed."""
        guards = self.guards
        if guards is not None and guards.armed:
            self._post(guards.on_config_changes, changes)

    def _guarded_keys_read_again(self) -> None:
        """After a full read of etcd (its watch broke, the history it missed compacted): a
        write of guarded keys that came in it reached no ``on_config_changes``, so each
        armed guard reads their mod revisions (``on_full_read``). One look-up while none is."""
        guards = self.guards
        if guards is not None and guards.armed:
            self._post(guards.on_full_read)

    def _take_inline(self, change: EtcdChange) -> bool:
        """A lone etcd change, on the watch thread: accept or reject it and push it here.

        Declined (False: the loop takes it, in order) until the daemon has started and
        replayed what came early, and while a push is due on the loop: a state the loop
        is holding back must not be overtaken."""
        if not self._inline_ok:
            return False
        with self._lock:
            if not self._inline_ok or self._pushes.due is not None or not self._pushes.soon.idle():
                return False
            self._dispatch(self._on_lone_etcd_change, (change,))
            if self._tail.later():
                return True
        self._tail.wait_and_finish()
        return True

    def _on_lone_etcd_change(self, change: EtcdChange) -> None:
        assert self.engine is not None
        # Before the push, whose acks the loop may take before this returns: the keys the
        # change edits run what etcd says, unless the engine rejects it (which refuses
        # them again, at this revision). Under ``_lock`` (``_take_inline``).
        if self.refused:
            self._took((change,))
        try:  # not a group: the engine may push it with the least work first
            self.engine.on_etcd_change(change.revision, change.puts, change.deletes, hold_tail=True)
        finally:
            self._changes_inline.inc()
        self._files.again()
        self._guarded_keys_written([change])

    def _took(self, changes: Iterable[EtcdChange]) -> None:
        """The keys each of ``changes`` edited run what etcd says now, unless the engine
        rejected that change (``RefusedKeys.taken``). On the loop, after the engine had
        them (a group's acks come after), each before a later one's refusal (see
        ``on_rejected``); on the watch thread, before (see above)."""
        changed = False
        for change in changes:
            if not self.refused:
                break  # nothing held (the common case), or nothing left to clear
            changed |= self.refused.taken(change.revision, [*change.puts, *change.deletes])
        if changed:
            self._post(self._feedback.refusals_changed)

    def _on_etcd_connection(self, up: bool, detail: str) -> None:
        """The watcher's transitions. Its first ``up`` (whenever the start's read and
        watch succeed) is no resume: only one after a reported loss is counted."""
        was = self.connected
        self.connected = up
        self._metrics.etcd_connected.set(1 if up else 0)
        if up and not was and self._etcd_lost:
            self._etcd_lost = False
            self._metrics.watch_resumes.inc()
            self._log.info("etcd_reconnected", detail=detail)
        elif not up:
            self._etcd_lost = True
            if was:
                self._log.warning("etcd_disconnected", detail=detail)

    def on_rejected(self, revision: int, reason: str, keys: tuple[str, ...]) -> None:
        """The engine rejected etcd's revision ``revision`` (the daemon's ``_on_rejected``,
        under ``_lock``): ``keys``, the keys the change edited, keep the values in force."""
        # In a group, the revisions before this one are taken first: one that took a
        # key this one refuses again ends the run of refusals before (0.9 taken, then
        # 1.6 refused, in one group), which would otherwise go on through it, as if
        # this daemon had refused 0.9 too (``RefusedKeys``).
        untaken, start = self._untaken, self._untaken_from
        end = start
        while end < len(untaken) and untaken[end].revision < revision:
            end += 1
        if end > start:
            self._untaken_from = end
            self._took(untaken[start:end])
        if self.refused.refused(revision, reason, keys):
            self._post(self._feedback.refusals_changed)

    def on_still_refused(self, revision: int, reason: str, keys: tuple[str, ...]) -> None:
        """From the engine, under ``_lock``: a full read refused again etcd values this
        daemon refused and reported before, unchanged since. No new rejection (neither
        counted nor reported), but they stay refused: the status entries and ``/healthz``
        say so as before the read."""
        if self.refused.refused(revision, reason, keys):
            self._post(self._feedback.refusals_changed)


def _counted(
    changes: Iterable[EtcdChange], counter: Any
) -> Iterator[tuple[int, Mapping[str, bytes], Iterable[str]]]:
    """The engine's form of each change, counted as the engine takes it (a group is lazy)."""
    for change in changes:
        counter.inc()
        yield change.revision, change.puts, change.deletes
