"""When a guard has passed: every watched process is done with its window, on every daemon.

Once this daemon's watched processes are done (``ArmedGuard.done_here``), the guard passes
only if, as the status entries of the app show, no other daemon's process may still be
inside its window, and none that reported what the guard reads before the change is still
waited for: one silent since (``REPORT_WAIT_S``), one not yet at the change (of this
daemon as of another), one whose entry is gone (its daemon may be restarting). Until then
the entries are read again, less and less often (``_REMOTE_CHECK_MAX_S``); the outcome
names those it passed without.

This is the look at the whole guard across the daemons, after the verdict on each
process's numbers (``guard_judging``); the guard manager (``guards.py``) asks for it
whenever a process may have become done, and ``GuardEnding`` writes the pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from hotknob.config.keys import status_prefix

from .armed_guard import REMOTE_CHECK_EVERY_S, ArmedGuard
from .guard_processes import ConnectedProcesses
from .guard_records import PASSED
from .status_entries import refused_here, remote_open_windows, remote_unjudged, status_name

_REMOTE_CHECK_MAX_S = 4.0
"""A daemon done with a guard reads the others' status entries (every process of the app)
every 0.5 s (``REMOTE_CHECK_EVERY_S``), then, while they are not done, twice as long after
each read, up to 4 s: with a hundred daemons that wait on a slow one, etcd serves a few
reads a second, not hundreds."""
_WAITING_NAMED = 20

Later = Callable[[float, str, ArmedGuard, Callable[[], None]], "asyncio.TimerHandle | None"]


class Passing:
    """Passes the armed guards (``active``, the manager's, by id) of this daemon's
    ``processes`` once nobody may still judge them (``finish``: ``GuardEnding.finish``).

    The status entries are read on the manager's worker (``read_status``) and the answer
    comes back on the loop (``then``); a look is asked for later with ``later`` (none once
    the daemon stops or the guard ends). ``report_wait``: ``REPORT_WAIT_S``, as set.
    """

    def __init__(
        self,
        *,
        app: str,
        node: str,
        log: Any,
        active: Mapping[str, ArmedGuard],
        processes: ConnectedProcesses,
        finish: Callable[[str, ArmedGuard, str, dict[str, Any]], None],
        read_status: Callable[[], Future[Any]],
        then: Callable[..., None],
        later: Later,
        stopped: Callable[[], bool],
        report_wait: float,
    ) -> None:
        self.app = app
        self.node = node
        self.log = log
        self._active = active
        self._processes = processes
        self._finish = finish
        self._read_status = read_status
        self._then = then
        self._later = later
        self._stopped = stopped
        self._report_wait = report_wait

    def maybe_passed(self, guard_id: str, active: ArmedGuard) -> None:
        """Pass the guard once this daemon's watched processes are done and, as their
        status entries show, no other daemon's process may still be inside the window."""
        if active.busy or not active.done_here:
            return
        now = time.monotonic()
        awaited, _ = active.awaited_here(self.node, self._report_wait, now)
        if awaited:
            self._note_waiting(guard_id, active, [status_name(self.node, c) for c in awaited])
            due = min(active.started_at[c] for c in awaited) + self._report_wait
            self.recheck(guard_id, active, max(due - now, 0.0))
            return
        if active.checking:
            return  # its answer comes back to ``_remote_checked``
        if now - active.checked_at < active.check_every:
            self.recheck(guard_id, active, active.checked_at + active.check_every - now)
            return
        active.checking, active.checked_at = True, now
        self._then(self._read_status(), self._remote_checked, guard_id, active)

    def recheck(self, guard_id: str, active: ArmedGuard, delay: float) -> None:
        """Ask ``maybe_passed`` again in ``delay`` seconds (once; on the loop). One asked for
        later already is put forward: a wait for a silent process (``REPORT_WAIT_S``) must
        not hold up the look that is due once it is done (it reported, or was unjudged)."""
        if active.recheck is not None:
            if active.recheck.when() <= asyncio.get_running_loop().time() + delay:
                return
            active.recheck.cancel()
            active.recheck = None

        def again() -> None:
            active.recheck = None
            self.maybe_passed(guard_id, active)

        active.recheck = self._later(delay, guard_id, active, again)

    def _remote_checked(
        self,
        guard_id: str,
        active: ArmedGuard,
        result: tuple[Mapping[str, bytes], int] | BaseException,
    ) -> None:
        active.checking = False
        if self._stopped() or self._active.get(guard_id) is not active or active.busy:
            return
        if not active.done_here:
            return  # a process went back to an earlier step meanwhile
        if isinstance(result, BaseException):
            self.log.warning("guard_check_failed", guard=guard_id, error=str(result))
            self.recheck(guard_id, active, REMOTE_CHECK_EVERY_S)
            return
        now = time.monotonic()
        awaited_here, unheard_here = active.awaited_here(self.node, self._report_wait, now)
        if awaited_here:  # one came back meanwhile (a reconnect)
            self.maybe_passed(guard_id, active)
            return
        kvs, _ = result
        prefix = status_prefix(self.app)
        mine = self._processes.mine()
        waiting, silent = remote_open_windows(
            kvs, prefix, self.node, guard_id, active.revision, active.record.keys, mine
        )
        silent += self._behind_here(active, kvs)
        awaited, unheard = active.awaited_remote(silent, self._report_wait, now)
        gone, unseen = active.awaited_remote(self._absent(active, kvs), self._report_wait, now)
        if waiting or awaited or gone:
            self._note_waiting(guard_id, active, sorted(waiting + awaited + gone))
            # Asked again, whether or not anyone reports: all may have stopped by now.
            active.check_every = min(active.check_every * 2, _REMOTE_CHECK_MAX_S)
            self.recheck(guard_id, active, active.check_every)
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
        unjudged = self.unjudged_names(active, kvs)
        if unjudged:
            outcome["reason"] += "; " + active.unjudged_text(unjudged)
            outcome["unjudged"] = unjudged
        self._finish(guard_id, active, PASSED, outcome)

    def _behind_here(self, active: ArmedGuard, kvs: Mapping[str, bytes]) -> list[str]:
        """This daemon's connected processes not yet at the change (``behind``: sent it,
        to apply at their next step), unless this daemon refused it (their entries in
        ``kvs`` say so), by name: waited for like another daemon's not yet at it
        (``remote_open_windows``). A process of a slow rank that reported what the guard
        reads before the change is otherwise never judged: the guard passed on the
        others' windows before it applied the change."""
        behind = self._processes.behind(active)
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
        here = self._processes.mine() | {status_name(self.node, c) for c in active.left}
        here |= {status_name(self.node, c) for c in (*active.passed, *active.unjudged)}
        return sorted(n for n in active.expected if n not in present and n not in here)

    def unjudged_names(self, active: ArmedGuard, kvs: Mapping[str, bytes]) -> list[str]:
        """Every daemon's processes done unjudged (``ReportJudge._unjudged``): this one's,
        and the others' as their entries (``kvs``, read just now) say, by name."""
        here = [status_name(self.node, c) for c in active.unjudged]
        there = remote_unjudged(
            kvs, status_prefix(self.app), self.node, active.record.id, self._processes.mine()
        )
        return sorted({*here, *there})

    def _note_waiting(self, guard_id: str, active: ArmedGuard, waiting: list[str]) -> None:
        """Log whom the guard waits for, when that changes (the first 20 names, and a count:
        a hundred nodes' processes would make lines of kilobytes)."""
        if waiting != active.waiting:
            shown = ",".join(waiting[:_WAITING_NAMED])
            if len(waiting) > _WAITING_NAMED:
                shown += f",(+{len(waiting) - _WAITING_NAMED} more)"
            self.log.info("guard_waiting", guard=guard_id, processes=shown, count=len(waiting))
        active.waiting = waiting
