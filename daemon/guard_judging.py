"""Judging one watched process's reports against an armed guard, a report at a time.

Each ``metrics`` report of a process inside its window (see ``guards``'s docstring) is
judged here: a NaN or ±inf value of a metric the guard reads reverts at once; otherwise
the guard is evaluated on the mean of the values reported since the previous report,
against that process's baseline (else the mean of all processes' baselines), and
``patience`` failures in a row revert. A process whose reports pass the end of its window
is done: passed if its last judged report held, unjudged if none of its window was judged.

This is the verdict on the numbers, one process at a time, and it reads and changes only
that process's part of the ``ArmedGuard``. Which processes are watched, when the guard
as a whole passes or is abandoned (across the daemons of the app), and how it ends are
the guard manager's (``guards.py``), which it tells through the callbacks it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .armed_guard import ArmedGuard
from .guard_eval import MissingValue
from .guard_records import GuardRecord
from .reports import Report, encode_value, mean_of
from .status_entries import status_name

_EVIDENCE_KEPT = 8

Settled = Callable[[str, ArmedGuard], None]


def _jsonable(values: Mapping[str, float]) -> dict[str, float | str]:
    return {k: encode_value(v) for k, v in values.items()}


class ReportJudge:
    """Judges the reports of this daemon's watched processes (``node``'s).

    ``revert`` ends a guard ``reverted`` (or ``blocked``: ``GuardEnding.revert``);
    ``maybe_passed`` and ``maybe_orphaned`` are the manager's looks at the whole guard once
    a process is done with its window; ``watching`` tells the status entries of processes
    whose window changed (done unjudged, or judged again), for other daemons to read at once.
    """

    def __init__(
        self,
        *,
        node: str,
        log: Any,
        revert: Callable[[str, ArmedGuard, str, list[dict[str, Any]]], None],
        maybe_passed: Settled,
        maybe_orphaned: Settled,
        watching: Callable[[list[str]], None],
    ) -> None:
        self.node = node
        self.log = log
        self._revert = revert
        self._maybe_passed = maybe_passed
        self._maybe_orphaned = maybe_orphaned
        self._watching = watching

    def check(
        self,
        guard_id: str,
        active: ArmedGuard,
        client: str,
        start: int,
        report: Report,
        previous: int | None,
    ) -> None:
        """Judge ``report`` if it holds a step of ``client``'s window, or if its last judged
        reports failed (then the process is watched on until one holds or ``patience`` of
        them fail); else mark the process done.

        A report holds the values of the steps after the previous report's (``previous``)
        up to its own: one at or past the window's end may still hold steps inside it, and
        the first after the change always does. So a window shorter than the steps between
        two reports is still judged, and the window's end does not pass a process whose
        metric is failing at that moment."""
        guard = active.guard
        values = {m: v for m in guard.metrics if (v := report.value(m)) is not None}
        end = start + active.record.window
        if not values:  # this report has none of what the guard reads
            if report.step >= end:
                self._past_window_unread(guard_id, active, client, report.step)
            return
        inside = report.step < end or previous is None or previous + 1 < end
        if not inside and client not in active.reported:
            # What it reads came only past the window: nothing of the window was judged, so
            # the process is done unjudged, not passed (a guard passed on it judged nothing).
            self._unjudged(guard_id, active, client, report.step)
            return
        active.reported.add(client)
        if client in active.unjudged:  # back at a step inside its window: judged from now
            active.unjudged.discard(client)
            self._watching([client])
        if not inside and client not in active.in_a_row:
            # Past its own window, its last judged report held: done, and what it
            # reports now is not judged.
            active.passed.add(client)
            self._maybe_passed(guard_id, active)
            return
        bad = report.non_finite(guard.metrics)
        if bad:
            name, value = sorted(bad.items())[0]
            evidence = [{"client": client, "step": report.step, "values": _jsonable(values)}]
            who = status_name(self.node, client)
            reason = f"{who} reported {name}={encode_value(value)} at step {report.step}"
            self._revert(guard_id, active, reason, evidence)
            return
        baselines = self._baselines(active.record, client)
        try:
            holds = guard.holds(values, baselines)
        except MissingValue:
            holds = None
        failures = active.failures.setdefault(client, [])
        if holds is False:
            count, first = active.in_a_row.get(client, (0, report.step))
            count += 1
            active.in_a_row[client] = (count, first)
            failures.append(
                {
                    "client": client,
                    "step": report.step,
                    "values": _jsonable(values),
                    "baselines": _jsonable(
                        {m: baselines[m] for m in guard.baselines if m in baselines}
                    ),
                }
            )
            del failures[:-_EVIDENCE_KEPT]  # the evidence kept; the count is apart
            if count >= active.record.patience:
                who = status_name(self.node, client)
                reason = (
                    f"{guard.text!r} failed on {count} reports in a row from {who} "
                    f"(steps {first}..{report.step})"
                    if count > 1
                    else f"{guard.text!r} failed on the report from {who} at step {report.step}"
                )
                self._revert(guard_id, active, reason, failures[-active.record.patience :])
                return
        elif holds is True:
            failures.clear()
            active.in_a_row.pop(client, None)
        if report.step >= end and client not in active.in_a_row:
            active.passed.add(client)  # its window is over, and its last judged report held
            self._maybe_passed(guard_id, active)

    def _past_window_unread(
        self, guard_id: str, active: ArmedGuard, client: str, step: int
    ) -> None:
        """``client`` reported past the end of its window (at ``step``), with none of what the
        guard reads: its window is over. It is done unjudged if nothing of it was judged;
        passed if its last judged report held, though what the guard reads came only inside
        the window (a metric reported now and then, or no longer: such a process used to
        keep the guard armed for as long as it ran); watched on while its last judged
        reports failed (``in_a_row``)."""
        if client not in active.reported:
            self._unjudged(guard_id, active, client, step)
        elif client not in active.in_a_row and client not in active.passed:
            active.passed.add(client)
            self._maybe_passed(guard_id, active)

    def _unjudged(self, guard_id: str, active: ArmedGuard, client: str, step: int) -> None:
        """``client``'s reports passed the end of its window with none of what the guard
        reads: it is done, unjudged. Its entry says so (other daemons neither wait for it
        nor leave the guard to this daemon for it); with no process here left to judge
        the guard, it may end ``abandoned`` (``_maybe_orphaned``), where it would
        otherwise stay armed for as long as the process runs."""
        if client in active.unjudged:
            return
        active.unjudged.add(client)
        self.log.info("guard_unjudged", guard=guard_id, client=client, step=step)
        self._watching([client])
        self._maybe_passed(guard_id, active)  # it may have been waited for (``awaited_here``)
        self._maybe_orphaned(guard_id, active)

    def _baselines(self, record: GuardRecord, client: str) -> dict[str, float]:
        """``client``'s own baseline of each metric, else the mean of all processes' ones."""
        pooled: dict[str, list[float]] = {}
        for values in record.baselines.values():
            for name, value in values.items():
                pooled.setdefault(name, []).append(value)
        means = {name: mean_of(vs) for name, vs in pooled.items()}
        return {**means, **record.baselines.get(status_name(self.node, client), {})}
