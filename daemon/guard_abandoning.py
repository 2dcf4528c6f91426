"""Ending a guard ``abandoned``: no process is left that could judge it.

Every watched process left before the end of its window or is unjudged, or none ever
applied the change (its daemon refused it, holds all its keys in a layer above etcd, or
the change altered no value in force there): such a guard would stay armed for ever. When
no process of this daemon is watched, it looks again ``ABANDON_AFTER_S`` seconds later
(time for a reconnect or a daemon restart); if none of this daemon can judge it then, nor,
as their status entries show, one of another daemon, the guard ends ``abandoned``, the
change stays, and the outcome says who left when, or why nothing judged it.

This is apart from passing (``guard_passing``), which ends a guard that was judged: here
nothing is left to judge it. The guard manager (``guards.py``) asks for the look whenever
a process may have left or a change may have reached nobody.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from typing import Any

from hotknob.config import restart_only_keys
from hotknob.config.keys import status_prefix
from hotknob.config.schema import restart_only_written

from .armed_guard import ArmedGuard
from .guard_display import some_names
from .guard_ending import ConfigInForce
from .guard_passing import Later
from .guard_processes import ConnectedProcesses
from .guard_records import ABANDONED
from .status_entries import refused_here, remote_watching, status_name

Settled = Callable[[str, ArmedGuard], None]


class Abandoning:
    """Ends the armed guards (``active``, the manager's, by id) that no process of this
    daemon's ``processes`` nor of another daemon can judge (``finish``:
    ``GuardEnding.finish``); one whose processes here are all done is ``maybe_passed``'s.

    The status entries are read on the manager's worker (``read_status``) and the answer
    comes back on the loop (``then``); the look waits ``abandon_after`` seconds
    (``later``), and none is taken once the daemon stops (``stopped``). ``config`` gives
    the configuration in force, to tell why nothing judged a change (``_unchanged_reason``);
    ``unjudged_names``: ``Passing.unjudged_names``.
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
        maybe_passed: Settled,
        unjudged_names: Callable[[ArmedGuard, Mapping[str, bytes]], list[str]],
        read_status: Callable[[], Future[Any]],
        then: Callable[..., None],
        later: Later,
        stopped: Callable[[], bool],
        abandon_after: float,
        config: Callable[[], ConfigInForce | None] | None,
    ) -> None:
        self.app = app
        self.node = node
        self.log = log
        self._active = active
        self._processes = processes
        self._finish = finish
        self._maybe_passed = maybe_passed
        self._unjudged_names = unjudged_names
        self._read_status = read_status
        self._then = then
        self._later = later
        self._stopped = stopped
        self._abandon_after = abandon_after
        self._config = config

    def on_revision_unchanged(self, revision: int) -> None:
        """etcd's ``revision`` changed no value in force: a guarded change at or before it
        may have no process left that will apply it (``_can_judge_here``)."""
        for guard_id, active in list(self._active.items()):
            if active.revision <= revision:
                self.maybe_orphaned(guard_id, active)

    def maybe_orphaned(self, guard_id: str, active: ArmedGuard) -> None:
        """If no process of this daemon is watched by the guard, look in
        ``ABANDON_AFTER_S`` seconds whether any can still judge it (a process may
        reconnect, or one not yet at the change apply it, meanwhile)."""
        if active.busy or self._stopped() or active.orphan is not None:
            return
        if self._processes.watched_here(active) or active.done_here:
            return  # watched, or ``maybe_passed`` ends it
        # A process not yet at the change does not put the look off: whether this daemon
        # refused the change, which it then never applies, is known here only from the
        # status entries that the look reads (``_orphan_checked``).

        def due() -> None:
            active.orphan = None
            self._orphan_due(guard_id, active)

        active.orphan = self._later(self._abandon_after, guard_id, active, due)

    @staticmethod
    def cancel(active: ArmedGuard) -> None:
        if active.orphan is not None:
            active.orphan.cancel()
            active.orphan = None

    def _can_judge_here(self, active: ArmedGuard, refused: Collection[str] = ()) -> bool:
        """Whether a process of this daemon is watched (``watched_here``), or connected
        and not yet at the change (``behind``: it ran a state before it, and may apply it
        at its next step), unless it is one of ``refused``: its daemon, this one, refused
        the change (as its status entry says: ``refused_here``), so no state with it
        comes for it."""
        if self._processes.watched_here(active):
            return True
        return any(c not in refused for c in self._processes.behind(active))

    def _orphan_due(self, guard_id: str, active: ArmedGuard) -> None:
        if active.busy or self._processes.watched_here(active):
            return
        if active.done_here:
            self._maybe_passed(guard_id, active)
            return
        self._then(self._read_status(), self._orphan_checked, guard_id, active)

    def _orphan_checked(
        self,
        guard_id: str,
        active: ArmedGuard,
        result: tuple[Mapping[str, bytes], int] | BaseException,
    ) -> None:
        if self._stopped() or self._active.get(guard_id) is not active or active.busy:
            return
        processes = self._processes
        if processes.watched_here(active) or active.done_here:
            self.maybe_orphaned(guard_id, active)
            return
        if isinstance(result, BaseException):
            self.log.warning("guard_check_failed", guard=guard_id, error=str(result))
            self.maybe_orphaned(guard_id, active)
            return
        kvs, _ = result
        prefix = status_prefix(self.app)
        refused = refused_here(kvs, prefix, self.node, processes.behind(active), active.revision)
        if self._can_judge_here(active, refused):  # one may still apply it: looked at again
            self.maybe_orphaned(guard_id, active)
            return
        keys = active.record.keys
        others = remote_watching(
            kvs, prefix, self.node, guard_id, active.revision, keys, processes.mine()
        )
        if others:  # their daemons end it; asked again in case they all go too
            self.maybe_orphaned(guard_id, active)
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
        elif any(processes.unchanged_for(c, active) for c in processes.acks):
            reason = self._unchanged_reason(active)
        else:
            reason = (
                "no process that ran the configuration before the change applied it "
                f"within {self._abandon_after:g} s"
            )
        outcome: dict[str, Any] = {"reason": reason + "; the change stays", "left": left}
        if unjudged:
            outcome["unjudged"] = unjudged
        self._finish(guard_id, active, ABANDONED, outcome)

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
