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
  waited for, no more than one of this daemon (``_unchanged_for``). A watched process that
  reported what the guard reads before the change (the record's ``reporting``) but
  has not since is waited for, ``REPORT_WAIT_S`` at most (its reports may come every
  few seconds, after the others are done), and so is one that has not applied the
  change yet, of this daemon as of another (``_behind_here``); the outcome names those
  it passed without (``unheard``). A process that left before the end of its window is no
  longer waited for; the outcome names it, with the failures in a row it had when
  it left (fewer than ``patience``: a departure is not a failure);
* a guard with no process left that could judge it (every watched process left
  before the end of its window or is unjudged, or none ever applied the change; one
  whose daemon refused the change, or holds all its keys in a layer above etcd, never
  will) for
  ``ABANDON_AFTER_S`` seconds (time for a reconnect or a daemon restart), on this
  daemon and, as the status entries show, on every other one, ends *abandoned*:
  the change stays, and the outcome says who left when.

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
thread like the config watcher.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hotknob.config import HotknobError, restart_only_keys
from hotknob.config.keys import status_prefix
from hotknob.config.schema import restart_only_written

from .announce import EventSink
from .armed_guard import REMOTE_CHECK_EVERY_S, ArmedGuard
from .etcd_store import EtcdChange, EtcdOptions, EtcdStore
from .etcd_watcher import EtcdWatcher
from .guard_ending import ConfigInForce, GuardEnding
from .guard_judging import ReportJudge
from .guard_lang import GuardSyntaxError, parse_guard
from .guard_records import (
    ABANDONED,
    ARMED,
    PASSED,
    GuardRecord,
    guard_key,
    guards_prefix,
    some_names,
)
from .guard_superseding import Superseding
from .logs import get_logger
from .reports import Report
from .status import (
    refused_here,
    remote_open_windows,
    remote_unjudged,
    remote_watching,
    status_name,
)

Post = Callable[..., None]
_ACKS_KEPT = 64
_REMOTE_CHECK_MAX_S = 4.0
"""A daemon done with a guard reads the others' status entries (every process of the app)
every 0.5 s (``REMOTE_CHECK_EVERY_S``), then, while they are not done, twice as long after
each read, up to 4 s: with a hundred daemons that wait on a slow one, etcd serves a few
reads a second, not hundreds."""
_WAITING_NAMED = 20

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
        self._watcher = EtcdWatcher(
            options,
            guards_prefix(app),
            on_snapshot=lambda kvs, rev: post(self._on_snapshot, kvs, rev),
            on_change=lambda change: post(self._on_change, change),
            name="hotknob-guard-watch",
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotknob-guards")
        self._active: dict[str, ArmedGuard] = {}
        self._resolving: set[str] = set()
        # Each process's acknowledgements: (revision, step, version). ``revision_of`` gives
        # the etcd revision whose configuration a version is now: later than the one it was
        # built at once an etcd revision changed no value in force (``_unchanged_for``).
        self._acks: dict[str, deque[tuple[int, int, int | None]]] = {}
        self._revision_of = revision_of
        self._config = config
        # Connected, but what they applied is unknown here (acknowledged with a version of
        # a daemon before this one: a restart that did not keep its versions).
        self._unknown: set[str] = set()
        # Every process connected here that acknowledged or reported something: whose
        # status entries are this daemon's own (``status._others``), whatever their node.
        self._clients: set[str] = set()
        self._stopped = False
        self._started = False  # its watch runs: etcd is there to read
        self._abandon_after = _seconds_from_env("HOTKNOB_GUARD_ABANDON_AFTER_S", ABANDON_AFTER_S)
        self._report_wait = _seconds_from_env("HOTKNOB_GUARD_REPORT_WAIT_S", REPORT_WAIT_S)
        self.log = get_logger("hotknob.guards", app=app, node=node)
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
        self._judge = ReportJudge(
            node=node,
            log=self.log,
            revert=self._ending.revert,
            maybe_passed=self._maybe_passed,
            maybe_orphaned=self._maybe_orphaned,
            watching=watching,
        )

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._watcher.start()

    def stopping(self) -> None:
        """The daemon is stopping (before its socket closes): the disconnects that follow
        are its own doing, not processes leaving, and no guard ends from now on. A guard
        still armed is picked up again by the next daemon (see the module's docstring)."""
        self._stopped = True

    def stop(self) -> None:
        """Blocking: stop the watch, finish or drop queued etcd calls, close the client."""
        self._stopped = True
        self._watcher.stop()
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._store.close()

    @property
    def active(self) -> list[str]:
        return sorted(self._active)

    # --- what the processes say (from the socket server, on the loop) --------------------------

    def on_applied(
        self, client: str, revision: int | None, step: int, version: int | None = None
    ) -> None:
        self._clients.add(client)
        if revision is None:
            self._unknown.add(client)
            return
        self._unknown.discard(client)
        self._acks.setdefault(client, deque(maxlen=_ACKS_KEPT)).append((revision, step, version))
        for active in self._active.values():
            if client not in active.started and revision >= active.revision:
                start = self._applied_at(active, client)
                if start is None:
                    continue  # started after the change: nothing to compare it with
                active.started[client] = start
                active.started_at[client] = time.monotonic()
                active.passed.discard(client)  # back under that name: watched anew
                active.unjudged.discard(client)
                active.left.pop(client, None)
                self._cancel_orphan(active)

    def _applied_at(self, active: ArmedGuard, client: str) -> int | None:
        """The step at which ``client`` applied the change: its first acknowledgement of a
        state of revision ≥ R after running one before R (acknowledged on this connection,
        or listed in the record: see the module's docstring); None if it never did."""
        ran_before = status_name(self.node, client) in active.before
        for revision, step, _ in self._acks.get(client, ()):
            if revision < active.revision:
                ran_before = True
            elif ran_before:
                return step
        return None

    def on_disconnect(self, client: str) -> None:
        """A process that went away mid-window is no longer waited for (the outcome will
        name it); one that had completed its window still counts as done (it may go as
        soon as it is). A guard with nobody left to judge it may end ``abandoned``. Not
        while the daemon stops: it closed the connection, the process did not leave."""
        if self._stopped:
            return
        self._acks.pop(client, None)
        self._unknown.discard(client)
        self._clients.discard(client)
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
            self._maybe_passed(guard_id, active)
            self._maybe_orphaned(guard_id, active)

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
        self._clients.add(client)
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

    def _maybe_passed(self, guard_id: str, active: ArmedGuard) -> None:
        """Pass the guard once this daemon's watched processes are done and, as their
        status entries show, no other daemon's process may still be inside the window."""
        if active.busy or not active.done_here:
            return
        now = time.monotonic()
        awaited, _ = active.awaited_here(self.node, self._report_wait, now)
        if awaited:
            self._note_waiting(guard_id, active, [status_name(self.node, c) for c in awaited])
            due = min(active.started_at[c] for c in awaited) + self._report_wait
            self._recheck(guard_id, active, max(due - now, 0.0))
            return
        if active.checking:
            return  # its answer comes back to ``_remote_checked``
        if now - active.checked_at < active.check_every:
            self._recheck(guard_id, active, active.checked_at + active.check_every - now)
            return
        active.checking, active.checked_at = True, now
        future = self._worker.submit(self._store.read_prefix, status_prefix(self.app))
        self._then(future, self._remote_checked, guard_id, active)

    def _recheck(self, guard_id: str, active: ArmedGuard, delay: float) -> None:
        """Ask ``_maybe_passed`` again in ``delay`` seconds (once; on the loop). One asked for
        later already is put forward: a wait for a silent process (``REPORT_WAIT_S``) must
        not hold up the look that is due once it is done (it reported, or was unjudged)."""
        if active.recheck is not None:
            if active.recheck.when() <= asyncio.get_running_loop().time() + delay:
                return
            active.recheck.cancel()
            active.recheck = None

        def again() -> None:
            active.recheck = None
            self._maybe_passed(guard_id, active)

        active.recheck = self._later(delay, guard_id, active, again)

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

    def _remote_checked(
        self,
        guard_id: str,
        active: ArmedGuard,
        result: tuple[Mapping[str, bytes], int] | BaseException,
    ) -> None:
        active.checking = False
        if self._stopped or self._active.get(guard_id) is not active or active.busy:
            return
        if not active.done_here:
            return  # a process went back to an earlier step meanwhile
        if isinstance(result, BaseException):
            self.log.warning("guard_check_failed", guard=guard_id, error=str(result))
            self._recheck(guard_id, active, REMOTE_CHECK_EVERY_S)
            return
        now = time.monotonic()
        awaited_here, unheard_here = active.awaited_here(self.node, self._report_wait, now)
        if awaited_here:  # one came back meanwhile (a reconnect)
            self._maybe_passed(guard_id, active)
            return
        kvs, _ = result
        prefix = status_prefix(self.app)
        waiting, silent = remote_open_windows(
            kvs, prefix, self.node, guard_id, active.revision, active.record.keys, self._mine()
        )
        silent += self._behind_here(active, kvs)
        awaited, unheard = active.awaited_remote(silent, self._report_wait, now)
        gone, unseen = active.awaited_remote(self._absent(active, kvs), self._report_wait, now)
        if waiting or awaited or gone:
            self._note_waiting(guard_id, active, sorted(waiting + awaited + gone))
            # Asked again, whether or not anyone reports: all may have stopped by now.
            active.check_every = min(active.check_every * 2, _REMOTE_CHECK_MAX_S)
            self._recheck(guard_id, active, active.check_every)
            return
        outcome: dict[str, Any] = {
            "reason": f"held for {active.record.window} steps",
            "clients": sorted(status_name(self.node, c) for c in active.passed),
        }
        left = [gone for gone in active.departures() if gone["reported"]]
        if left:
            outcome["reason"] += "; " + active.departures_text(left)
            outcome["left"] = left
        unheard = sorted(unheard_here + unheard)
        if unheard:
            outcome["reason"] += "; " + active.unheard_text(unheard, self._report_wait)
            outcome["unheard"] = unheard
        if unseen:
            outcome["reason"] += "; " + active.unseen_text(unseen, self._report_wait)
            outcome["unseen"] = unseen
        unjudged = self._unjudged_names(active, kvs)
        if unjudged:
            outcome["reason"] += "; " + active.unjudged_text(unjudged)
            outcome["unjudged"] = unjudged
        self._ending.finish(guard_id, active, PASSED, outcome)

    def _behind_here(self, active: ArmedGuard, kvs: Mapping[str, bytes]) -> list[str]:
        """This daemon's connected processes not yet at the change (``_behind``: sent it,
        to apply at their next step), unless this daemon refused it (their entries in
        ``kvs`` say so), by name: waited for like another daemon's not yet at it
        (``remote_open_windows``). A process of a slow rank that reported what the guard
        reads before the change is otherwise never judged: the guard passed on the
        others' windows before it applied the change."""
        behind = self._behind(active)
        refused = refused_here(kvs, status_prefix(self.app), self.node, behind, active.revision)
        return [status_name(self.node, c) for c in behind if c not in refused]

    def _absent(self, active: ArmedGuard, kvs: Mapping[str, bytes]) -> list[str]:
        """The processes that reported what the guard reads before the change (the record's
        ``reporting``) with no status entry now (``kvs``), but for this daemon's own: one
        that left is named as such (``left``). Their daemon may be restarting (its entries
        went with it, or with its lease): they are waited for as a silent one is, where the
        guard used to pass at once on the other daemons' processes without a word of them,
        and then named (``unseen``)."""
        prefix = status_prefix(self.app)
        present = {key[len(prefix) :] for key in kvs}
        here = self._mine() | {status_name(self.node, c) for c in active.left}
        here |= {status_name(self.node, c) for c in (*active.passed, *active.unjudged)}
        return sorted(n for n in active.expected if n not in present and n not in here)

    def _unjudged_names(self, active: ArmedGuard, kvs: Mapping[str, bytes]) -> list[str]:
        """Every daemon's processes done unjudged (``ReportJudge._unjudged``): this one's,
        and the others' as their entries (``kvs``, read just now) say, by name."""
        here = [status_name(self.node, c) for c in active.unjudged]
        there = remote_unjudged(
            kvs, status_prefix(self.app), self.node, active.record.id, self._mine()
        )
        return sorted({*here, *there})

    def _mine(self) -> set[str]:
        """This daemon's connected processes, by name: the status entries it writes. Another
        daemon of the app may have the same node name (on one host, by default)."""
        return {status_name(self.node, c) for c in self._clients}

    def _note_waiting(self, guard_id: str, active: ArmedGuard, waiting: list[str]) -> None:
        """Log whom the guard waits for, when that changes (the first 20 names, and a count:
        a hundred nodes' processes would make lines of kilobytes)."""
        if waiting != active.waiting:
            shown = ",".join(waiting[:_WAITING_NAMED])
            if len(waiting) > _WAITING_NAMED:
                shown += f",(+{len(waiting) - _WAITING_NAMED} more)"
            self.log.info("guard_waiting", guard=guard_id, processes=shown, count=len(waiting))
        active.waiting = waiting

    # --- a guard nobody is left to judge --------------------------------------------------------

    def _watched_here(self, active: ArmedGuard) -> bool:
        """Whether a process of this daemon is watched, or listed in the record and
        connected with a state this daemon does not know (it applies this daemon's at its
        next step)."""
        if active.judging_here:
            return True
        return any(status_name(self.node, c) in active.before for c in self._unknown)

    def _behind(self, active: ArmedGuard) -> list[str]:
        """The connected processes of this daemon last seen applying a state from before
        the change that may still apply it at their next step: the change altered a value
        in force here (``_unchanged_for``)."""
        return [
            c
            for c, acks in self._acks.items()
            if acks and acks[-1][0] < active.revision and not self._unchanged_for(c, active)
        ]

    def _can_judge_here(self, active: ArmedGuard, refused: Collection[str] = ()) -> bool:
        """Whether a process of this daemon is watched (``_watched_here``), or connected
        and not yet at the change (``_behind``: it ran a state before it, and may apply it
        at its next step), unless it is one of ``refused``: its daemon, this one, refused
        the change (as its status entry says: ``refused_here``), so no state with it
        comes for it."""
        if self._watched_here(active):
            return True
        return any(c not in refused for c in self._behind(active))

    def _unchanged_for(self, client: str, active: ArmedGuard) -> bool:
        """Whether ``client``, last seen applying a state from before the change, runs the
        change's configuration with that state: the change altered no value in force on
        this daemon (its values were already in force, or a higher layer holds its keys),
        so no new state comes for it."""
        acks = self._acks.get(client)
        if not acks:
            return False
        revision, _, version = acks[-1]
        if revision >= active.revision or version is None:
            return False
        now = self._revision_of(version)
        return now is not None and now >= active.revision

    def _unchanged_reason(self, active: ArmedGuard) -> str:
        """Why no process of this daemon got a state with the change: its keys are all
        restart-only (held back until a restart, which no guard window sees), or it
        altered no value in force."""
        config = self._config() if self._config is not None else None
        keys = sorted(active.record.keys)
        restart_only = restart_only_keys(config.schema) if config is not None else frozenset()
        if keys and all(restart_only_written([key], restart_only) for key in keys):
            return (
                f"the change is of restart-only keys ({', '.join(keys)}): a running process "
                "keeps the value it started with, so nothing judged it"
            )
        return (
            "the change altered no value in force (its values were already in force, "
            "or a higher layer holds its keys): nothing to judge"
        )

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
        may have no process left that will apply it (``_can_judge_here``)."""
        for guard_id, active in list(self._active.items()):
            if active.revision <= revision:
                self._maybe_orphaned(guard_id, active)

    def _maybe_orphaned(self, guard_id: str, active: ArmedGuard) -> None:
        """If no process of this daemon is watched by the guard, look in
        ``ABANDON_AFTER_S`` seconds whether any can still judge it (a process may
        reconnect, or one not yet at the change apply it, meanwhile)."""
        if active.busy or self._stopped or active.orphan is not None:
            return
        if self._watched_here(active) or active.done_here:
            return  # watched, or ``_maybe_passed`` ends it
        # A process not yet at the change does not put the look off: whether this daemon
        # refused the change, which it then never applies, is known here only from the
        # status entries that the look reads (``_orphan_checked``).

        def due() -> None:
            active.orphan = None
            self._orphan_due(guard_id, active)

        active.orphan = self._later(self._abandon_after, guard_id, active, due)

    def _cancel_orphan(self, active: ArmedGuard) -> None:
        if active.orphan is not None:
            active.orphan.cancel()
            active.orphan = None

    def _orphan_due(self, guard_id: str, active: ArmedGuard) -> None:
        if active.busy or self._watched_here(active):
            return
        if active.done_here:
            self._maybe_passed(guard_id, active)
            return
        future = self._worker.submit(self._store.read_prefix, status_prefix(self.app))
        self._then(future, self._orphan_checked, guard_id, active)

    def _orphan_checked(
        self,
        guard_id: str,
        active: ArmedGuard,
        result: tuple[Mapping[str, bytes], int] | BaseException,
    ) -> None:
        if self._stopped or self._active.get(guard_id) is not active or active.busy:
            return
        if self._watched_here(active) or active.done_here:
            self._maybe_orphaned(guard_id, active)
            return
        if isinstance(result, BaseException):
            self.log.warning("guard_check_failed", guard=guard_id, error=str(result))
            self._maybe_orphaned(guard_id, active)
            return
        kvs, _ = result
        prefix = status_prefix(self.app)
        refused = refused_here(kvs, prefix, self.node, self._behind(active), active.revision)
        if self._can_judge_here(active, refused):  # one may still apply it: looked at again
            self._maybe_orphaned(guard_id, active)
            return
        keys = active.record.keys
        others = remote_watching(
            kvs, prefix, self.node, guard_id, active.revision, keys, self._mine()
        )
        if others:  # their daemons end it; asked again in case they all go too
            self._maybe_orphaned(guard_id, active)
            return
        left = active.departures()
        gone = [active.departures_text(left)] if left else []
        if refused:
            names = some_names([status_name(self.node, c) for c in refused])
            gone.append(f"the daemon of {names} refused the change (`hotknob status` says why)")
        unjudged = self._unjudged_names(active, kvs)
        if unjudged:
            gone.append(active.unjudged_text(unjudged))
        if gone:
            reason = "no process left to judge it: " + "; ".join(gone)
        elif any(self._unchanged_for(c, active) for c in self._acks):
            reason = self._unchanged_reason(active)
        else:
            reason = (
                "no process that ran the configuration before the change applied it "
                f"within {self._abandon_after:g} s"
            )
        outcome: dict[str, Any] = {"reason": reason + "; the change stays", "left": left}
        if unjudged:
            outcome["unjudged"] = unjudged
        self._ending.finish(guard_id, active, ABANDONED, outcome)

    # --- records (from the guard watch, on the loop) ------------------------------------------

    def _on_snapshot(self, kvs: Mapping[str, bytes], revision: int) -> None:
        seen = set()
        for path, raw in kvs.items():
            record = self._parse(path, raw)
            if record is None:
                continue
            seen.add(record.id)
            self._each(path, self._take_snapshot_record, record)
        for guard_id in list(self._active):
            if guard_id not in seen:
                self._drop(guard_id, None)

    def _take_snapshot_record(self, record: GuardRecord) -> None:
        if record.state != ARMED:
            self._drop(record.id, record)
        elif record.id not in self._active and record.id not in self._resolving:
            self._resolving.add(record.id)
            future = self._worker.submit(self._mod_revision, guard_key(self.app, record.id))
            self._then(future, self._arm_resolved, record)

    def _on_change(self, change: EtcdChange) -> None:
        for path in change.deletes:
            self._drop(path.rsplit("/", 1)[-1], None)
        for path, raw in change.puts.items():
            record = self._parse(path, raw)
            if record is None:
                continue
            self._each(path, self._take_changed_record, record, change.revision)

    def _take_changed_record(self, record: GuardRecord, revision: int) -> None:
        if record.state != ARMED:
            self._drop(record.id, record, revision)
        elif record.id not in self._active:
            self._arm(record, revision)

    def _each(self, path: str, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` for one record: a surprise in one never stops the others."""
        try:
            fn(*args)
        except Exception as exc:
            self.log.exception("guard_record_failed", key=path, error=str(exc))

    def _parse(self, path: str, raw: bytes) -> GuardRecord | None:
        try:
            record = GuardRecord.from_json(raw)
        except Exception as exc:  # from_json says ValueError; a record must never stop the rest
            self.log.warning("guard_record_invalid", key=path, error=str(exc))
            return None
        if guard_key(self.app, record.id) != path:
            self.log.warning("guard_record_invalid", key=path, error="id does not match the key")
            return None
        return record

    def _arm_resolved(self, record: GuardRecord, result: int | BaseException) -> None:
        self._resolving.discard(record.id)
        if isinstance(result, BaseException):
            self.log.warning("guard_arm_failed", guard=record.id, error=str(result))
            return
        if result > 0 and record.id not in self._active:
            self._arm(record, result)

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
        for client in self._acks:
            start = self._applied_at(active, client)
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
        self._maybe_orphaned(record.id, active)

    def _drop(self, guard_id: str, record: GuardRecord | None, revision: int = 0) -> None:
        """Stop watching a guard: ended (``record`` says how, written at ``revision``; 0:
        read in a snapshot), or its record deleted (None): by hand, the way to end a guard
        that waits on a stuck process. An ending another daemon wrote is sent to this
        one's ``watch`` clients too: they watch the app, whichever daemon wrote it."""
        active = self._active.pop(guard_id, None)
        if active is None:
            return
        self._cancel_orphan(active)
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
