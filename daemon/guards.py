"""The guard manager: watches guarded changes and reverts one whose metrics get worse.

A guarded change is a record in etcd (see ``guard_records``) written in the same
transaction as the change, at revision R. Every daemon of the app watches the
records and, for its own processes:

* a process is *watched* only if it applied the change: it ran a state from before
  R and then acknowledged one of revision ≥ R. It ran one before R if this daemon saw
  it acknowledge one (on this connection), or if the record lists it among the
  processes that had a status entry when the change was written (so that it is
  watched again after a daemon restart or a reconnect). A process that started after
  the change (its first acknowledgement is already at or after R, and it is not
  listed) never ran without the change: it is never judged, nor waited for. A
  process is known by its name (``<node>/<client>``);
* it is watched from the step at which it acknowledged the first state of revision
  ≥ R (the step the change landed in it), for ``window`` steps. A report holds the
  steps after the previous report's: one that holds no step below start + ``window``
  is not judged, and marks the process done, if the last judged report held; while
  failures in a row are short of ``patience``, the process is watched on past its
  window (``guard_judging``). One whose reports pass the end of its window with none of
  what the guard reads (a typo, or a run that does not report it) is done, *unjudged*:
  it neither holds the guard up nor can judge it (``ReportJudge._unjudged``), and what
  it reports of it later does not count: nothing of its window was judged;
* each ``metrics`` report within a watched process's window is checked: a NaN or
  ±inf value of a metric the guard reads reverts at once; otherwise the guard is
  evaluated on the mean of the values reported since the previous report, against
  that process's baseline (else the mean of all processes' baselines), and
  ``patience`` failures in a row revert; if a process's step goes below the start
  of its window (it reloaded an earlier checkpoint), its window starts again at
  that step;
* when every watched process that reported has passed its window, on this
  daemon and, as their status entries show, on every other daemon of the app,
  the guard has *passed*. A process of another daemon is taken as done once its
  own daemon says so in its status entry (``windows_of``); one for which the change
  altered no value in force, as its entry says (``status.unchanged_by``), is not
  waited for, no more than one of this daemon (``ConnectedProcesses.unchanged_for``). A
  watched process that reported what the guard reads before the change (the record's
  ``reporting``) but has not since is waited for, ``REPORT_WAIT_S`` at most (its reports
  may come every few seconds, after the others are done), and so is one that has not
  applied the change yet, of this daemon as of another (``Passing._behind_here``); the
  outcome names those it passed without (``unheard``). A process that left before the
  end of its window is no longer waited for; the outcome names it, with the failures in
  a row it had when it left (fewer than ``patience``: a departure is not a failure)
  (``guard_passing``);
* a guard with no process left that could judge it (every watched process left
  before the end of its window or is unjudged, or none ever applied the change; one
  whose daemon refused the change, or holds all its keys in a layer above etcd, never
  will) for
  ``ABANDON_AFTER_S`` seconds (time for a reconnect or a daemon restart), on this
  daemon and, as the status entries show, on every other one, ends *abandoned*:
  the change stays, and the outcome says who left when (``guard_abandoning``).

A guard's ending (and a revert's old values) is ONE etcd transaction that lands only if
nobody changed the guarded keys since, once across daemons, and a revert only if the
daemon would take it: ``guard_ending.py``.

Guards survive a restart: an armed record read at start is armed again (its
mod revision is R, since armed records are never rewritten); the processes it
lists are watched again from their first acknowledgement after the restart (with
``LiveConfig``, that carries the step at which it applied the state it holds: its
window resumes if the restarted daemon's state is that one, and else starts again
at the step it applies the new one). The failures in a row counted before the
restart are not kept.

Everything here runs on the daemon's event loop except etcd calls, which run
on one worker thread and post their result back; the watch runs on its own
thread like the config watcher (``guard_watch``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hotknob.config import HotknobError
from hotknob.config.keys import status_prefix

from .announce import EventSink
from .armed_guard import ArmedGuard
from .etcd_store import EtcdChange, EtcdOptions, EtcdStore
from .guard_abandoning import Abandoning
from .guard_ending import ConfigInForce, GuardEnding
from .guard_judging import ReportJudge
from .guard_lang import GuardSyntaxError, parse_guard
from .guard_passing import Passing
from .guard_processes import ConnectedProcesses
from .guard_records import GuardRecord
from .guard_superseding import Superseding
from .guard_watch import GuardWatch
from .logs import get_logger
from .reports import Report
from .status_entries import status_name

Post = Callable[..., None]

ABANDON_AFTER_S = 30.0
"""How long a guard may have no process that could judge it before it ends ``abandoned``:
time for a process to reconnect, or for a daemon to restart and its processes to come
back. ``HOTKNOB_GUARD_ABANDON_AFTER_S`` sets it."""

REPORT_WAIT_S = 30.0
"""How long a guard waits, before it passes, for the first report since the change of a
process that applied it and reported what the guard reads before it (the record's
``reporting``): its reports may come every few seconds, or later than the others'.
``HOTKNOB_GUARD_REPORT_WAIT_S`` sets it."""


def _seconds_from_env(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= 0 and value < float("inf") else default


class GuardManager:
    """Guards of one app on one daemon. ``start``/``stop`` own a watch thread and a worker.

    ``config`` gives the configuration in force (the daemon's engine), which a revert is
    validated against. Without one (None), reverts are written as recorded, unvalidated.
    """

    def __init__(
        self,
        *,
        app: str,
        node: str,
        options: EtcdOptions,
        post: Post,
        broadcast: EventSink,
        config: Callable[[], ConfigInForce | None] | None = None,
        revision_of: Callable[[int], int | None] = lambda version: None,
        watching: Callable[[list[str]], None] = lambda clients: None,
    ) -> None:
        self.app = app
        # Told of the processes a guard armed here watches at once (they applied the change
        # before the record reached this daemon): their status entries must show the
        # window now, for other daemons to wait on it, not at their next report.
        self._watching = watching
        self.node = node
        self._post = post
        self._store = EtcdStore(options)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotknob-guards")
        self._active: dict[str, ArmedGuard] = {}
        self._processes = ConnectedProcesses(node=node, revision_of=revision_of)
        self._stopped = False
        self._started = False  # its watch runs: etcd is there to read
        self.log = get_logger("hotknob.guards", app=app, node=node)
        self._watch = GuardWatch(
            app=app,
            options=options,
            post=post,
            log=self.log,
            active=self._active,
            arm=self._arm,
            drop=self._drop,
            submit=self._worker.submit,
            mod_revision=self._mod_revision,
            then=self._then,
        )
        self._ending = GuardEnding(
            app=app,
            node=node,
            log=self.log,
            broadcast=broadcast,
            commit=lambda puts, deletes, expect: self._worker.submit(
                self._store.commit, puts, deletes, expect_mod_revisions=expect
            ),
            then=self._then,
            ended=lambda guard_id: self._active.pop(guard_id, None),
            stopped=lambda: self._stopped,
            config=config,
        )
        self._superseding = Superseding(
            app=app,
            log=self.log,
            active=self._active,
            finish=self._ending.finish,
            submit=self._worker.submit,
            mod_revision=self._mod_revision,
            then=self._then,
            etcd_there=lambda: self._started,
            stopped=lambda: self._stopped,
        )
        self._passing = Passing(
            app=app,
            node=node,
            log=self.log,
            active=self._active,
            processes=self._processes,
            finish=self._ending.finish,
            read_status=self._read_status,
            then=self._then,
            later=self._later,
            stopped=lambda: self._stopped,
            report_wait=_seconds_from_env("HOTKNOB_GUARD_REPORT_WAIT_S", REPORT_WAIT_S),
        )
        self._abandoning = Abandoning(
            app=app,
            node=node,
            log=self.log,
            active=self._active,
            processes=self._processes,
            finish=self._ending.finish,
            maybe_passed=self._passing.maybe_passed,
            unjudged_names=self._passing.unjudged_names,
            read_status=self._read_status,
            then=self._then,
            later=self._later,
            stopped=lambda: self._stopped,
            abandon_after=_seconds_from_env("HOTKNOB_GUARD_ABANDON_AFTER_S", ABANDON_AFTER_S),
            config=config,
        )
        self._judge = ReportJudge(
            node=node,
            log=self.log,
            revert=self._ending.revert,
            maybe_passed=self._passing.maybe_passed,
            maybe_orphaned=self._abandoning.maybe_orphaned,
            watching=watching,
        )

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._watch.start()

    def stopping(self) -> None:
        """The daemon is stopping (before its socket closes): the disconnects that follow
        are its own doing, not processes leaving, and no guard ends from now on. A guard
        still armed is picked up again by the next daemon (see the module's docstring)."""
        self._stopped = True

    def stop(self) -> None:
        """Blocking: stop the watch, finish or drop queued etcd calls, close the client."""
        self._stopped = True
        self._watch.stop()
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._store.close()

    @property
    def active(self) -> list[str]:
        return sorted(self._active)

    # --- what the processes say (from the socket server, on the loop) --------------------------

    def on_applied(
        self, client: str, revision: int | None, step: int, version: int | None = None
    ) -> None:
        self._processes.applied(client, revision, step, version)
        if revision is None:
            return
        for active in self._active.values():
            if client not in active.started and revision >= active.revision:
                start = self._processes.applied_at(active, client)
                if start is None:
                    continue  # started after the change: nothing to compare it with
                active.started[client] = start
                active.started_at[client] = time.monotonic()
                active.passed.discard(client)  # back under that name: watched anew
                active.unjudged.discard(client)
                active.left.pop(client, None)
                self._abandoning.cancel(active)

    def on_disconnect(self, client: str) -> None:
        """A process that went away mid-window is no longer waited for (the outcome will
        name it); one that had completed its window still counts as done (it may go as
        soon as it is). A guard with nobody left to judge it may end ``abandoned``. Not
        while the daemon stops: it closed the connection, the process did not leave."""
        if self._stopped:
            return
        self._processes.left(client)
        for guard_id, active in list(self._active.items()):
            start = active.started.pop(client, None)
            active.started_at.pop(client, None)
            in_a_row, _ = active.in_a_row.pop(client, (0, 0))
            active.failures.pop(client, None)
            last = active.last_step.pop(client, None)
            # One done with its window, passed or unjudged, stays so: it did not leave
            # before the end of its window, and the outcome names it for what it was.
            if client not in active.passed and client not in active.unjudged:
                if start is not None:
                    active.left[client] = {
                        "client": status_name(self.node, client),  # as other reasons name it
                        "from": start,
                        "step": last,
                        "reported": client in active.reported,
                        "failures": in_a_row,
                    }
                active.reported.discard(client)
            self._passing.maybe_passed(guard_id, active)
            self._abandoning.maybe_orphaned(guard_id, active)

    def windows_of(self, client: str) -> dict[str, dict[str, Any]]:
        """For ``client``'s status entry: each guard watching it, with the step its window
        started at, whether it reported what the guard reads since, and whether its window
        is done. Other daemons read it to know when the guard may pass."""
        return {
            guard_id: {
                "from": start,
                "reported": client in active.reported,
                "done": client in active.passed or client in active.unjudged,
                **({"unjudged": True} if client in active.unjudged else {}),
            }
            for guard_id, active in self._active.items()
            if (start := active.started.get(client)) is not None
        }

    def on_report(self, client: str, report: Report) -> None:
        """Check ``report`` for every guard that watches ``client`` (one that applied the
        change), if it is inside the window. A step below the window's start means the
        process went back to an earlier checkpoint: its window starts again at that step
        (so it is watched for ``window`` steps from there), and the report is checked like
        any other."""
        self._processes.clients.add(client)
        for guard_id, active in list(self._active.items()):
            start = active.started.get(client)
            if active.busy or start is None:
                continue
            previous = active.last_step.get(client)
            if report.step < start:
                start = active.started[client] = report.step
                active.passed.discard(client)
                active.unjudged.discard(client)
                previous = None  # a new window: this report is its first
            active.last_step[client] = report.step
            self._judge.check(guard_id, active, client, start, report, previous)

    def _later(
        self, delay: float, guard_id: str, active: ArmedGuard, fn: Callable[[], None]
    ) -> asyncio.TimerHandle | None:
        """Run ``fn`` on the loop in ``delay`` seconds, unless the daemon stops or the guard
        ends meanwhile; None when not on a loop (a test driving the manager by hand)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None

        def due() -> None:
            if not self._stopped and self._active.get(guard_id) is active:
                fn()

        return loop.call_later(delay, due)

    @property
    def armed(self) -> bool:
        """Whether any guard is armed here: read on the etcd watch thread, for each change."""
        return bool(self._active)

    def on_config_changes(self, changes: Collection[EtcdChange]) -> None:
        """On the loop, after the engine had ``changes``: a guard whose keys one of them
        wrote ends ``superseded`` (``Superseding.on_config_changes``)."""
        self._superseding.on_config_changes(changes)

    def on_full_read(self) -> None:
        """On the loop, after the config watch read etcd in full: a guard whose keys were
        written meanwhile ends ``superseded`` (``Superseding.on_full_read``)."""
        self._superseding.on_full_read()

    def on_revision_unchanged(self, revision: int) -> None:
        """etcd's ``revision`` changed no value in force: a guarded change at or before it
        may have no process left that will apply it (``Abandoning.on_revision_unchanged``)."""
        self._abandoning.on_revision_unchanged(revision)

    # --- records (from the guard watch, ``GuardWatch``, on the loop) -----------------------------

    def _arm(self, record: GuardRecord, revision: int) -> None:
        try:
            guard = parse_guard(record.guard)
        except GuardSyntaxError as exc:
            self.log.warning("guard_record_invalid", guard=record.id, error=str(exc))
            return
        active = ArmedGuard(
            record,
            guard,
            revision,
            record.applied_before(),
            expected=frozenset(record.reporting or ()),
        )
        now = time.monotonic()
        for client in self._processes.acks:
            start = self._processes.applied_at(active, client)
            if start is not None:
                active.started[client] = start
                active.started_at[client] = now
        self._active[record.id] = active
        if active.started:
            self._watching(sorted(active.started))
        self.log.info(
            "guard_armed",
            guard=record.id,
            expr=record.guard,
            key=",".join(sorted(record.keys)),
            window=record.window,
            patience=record.patience,
            revision=revision,
        )
        self._superseding.written_since(active)
        self._abandoning.maybe_orphaned(record.id, active)

    def _drop(self, guard_id: str, record: GuardRecord | None, revision: int = 0) -> None:
        """Stop watching a guard: ended (``record`` says how, written at ``revision``; 0:
        read in a snapshot), or its record deleted (None): by hand, the way to end a guard
        that waits on a stuck process. An ending another daemon wrote is sent to this
        one's ``watch`` clients too: they watch the app, whichever daemon wrote it."""
        active = self._active.pop(guard_id, None)
        if active is None:
            return
        self._abandoning.cancel(active)
        if record is not None:
            self.log.info("guard_ended", guard=guard_id, state=record.state)
            if revision:
                self._ending.announce(active, record, revision)
        else:
            self.log.info(
                "guard_removed",
                guard=guard_id,
                reason="its record was deleted from etcd: no longer watched, nothing reverted",
            )

    def _mod_revision(self, key: str) -> int:
        """The mod revision of ``key`` (0: absent), on the worker."""
        assert self._store is not None
        return self._store.mod_revision(key)

    def _read_status(self) -> Future[Any]:
        """The app's status entries (every process's, every daemon's), read on the worker."""
        return self._worker.submit(self._store.read_prefix, status_prefix(self.app))

    def _then(self, future: Future[Any], fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args, result or exception)`` on the loop when ``future`` is done."""

        def done(f: Future[Any]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            result: Any = exc if exc is not None else f.result()
            if exc is not None and not isinstance(exc, HotknobError | OSError):
                self.log.error("guard_worker_failed", error=repr(exc))
            self._post(fn, *args, result)

        future.add_done_callback(done)
