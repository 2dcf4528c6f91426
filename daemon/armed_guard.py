"""What one armed guard knows on one daemon: which processes it watches, from which step,
what they reported, who is done, who left, and whom it still waits for.

``GuardManager`` (``guards``) keeps one ``ArmedGuard`` per armed record and does the
watching, timing and writing; the answers that follow from this state alone are here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from .guard_display import some_names
from .guard_eval import Guard
from .guard_records import GuardRecord
from .status_entries import status_name

REMOTE_CHECK_EVERY_S = 0.5
_LEFT_NAMED = 3  # departures named in a reason; the outcome's ``left`` has them all


@dataclass
class ArmedGuard:
    """One armed guard's record (guarding revision ``revision``) and what this daemon knows
    of the processes it watches, by client name (``<node>/<client>`` status names where
    said). Changed only on the daemon's loop."""

    record: GuardRecord
    guard: Guard
    revision: int
    before: frozenset[str] = frozenset()  # status names known to have run a state before R
    started: dict[str, int] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)  # monotonic, when seen applied
    expected: frozenset[str] = frozenset()  # status names that report what the guard reads
    unheard_since: dict[str, float] = field(default_factory=dict)  # other daemons' ones
    failures: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # evidence kept
    in_a_row: dict[str, tuple[int, int]] = field(default_factory=dict)  # failures, first step
    last_step: dict[str, int] = field(default_factory=dict)  # of each watched one's report
    left: dict[str, dict[str, Any]] = field(default_factory=dict)  # gone before its window ended
    reported: set[str] = field(default_factory=set)
    passed: set[str] = field(default_factory=set)
    # Past their window with no report of what the guard reads (a typo in the guard, or a
    # run that does not report it): done, unjudged. Nothing of theirs can judge it.
    unjudged: set[str] = field(default_factory=set)
    busy: bool = False
    announced: bool = False  # its ending was sent to this daemon's ``watch`` clients
    checking: bool = False  # a read of the other daemons' processes is in flight
    checked_at: float = 0.0
    check_every: float = REMOTE_CHECK_EVERY_S  # doubled after each read that finds a wait
    waiting: list[str] = field(default_factory=list)  # their processes still in the window
    recheck: asyncio.TimerHandle | None = None  # the next look at the others, when due
    orphan: asyncio.TimerHandle | None = None  # the look for anyone left to judge it, when due

    @property
    def done_here(self) -> bool:
        """Every process of this daemon that reported since the change is done with its
        window (and at least one did)."""
        return bool(self.reported) and self.reported <= self.passed

    def awaited_here(self, node: str, wait: float, now: float) -> tuple[list[str], list[str]]:
        """This daemon's processes that applied the change and reported what the guard
        reads before it (the record's ``reporting``) but nothing since: the guard waits for
        those (first list, client names) for ``wait`` seconds, and no longer for the
        others (second list, status names, for the outcome)."""
        awaited: list[str] = []
        unheard: list[str] = []
        for client, since in self.started_at.items():
            name = status_name(node, client)
            # One done unjudged did report since (with none of what the guard reads): it
            # is not waited for, as another daemon's is not (its entry says done).
            if name not in self.expected or client in self.reported or client in self.unjudged:
                continue
            if now - since < wait:
                awaited.append(client)
            else:
                unheard.append(name)
        return awaited, unheard

    def awaited_remote(
        self, silent: list[str], wait: float, now: float
    ) -> tuple[list[str], list[str]]:
        """``awaited_here`` for other daemons' processes that applied the change and have
        not reported since (``silent``, by name); the time runs from when this daemon first
        saw them so."""
        awaited: list[str] = []
        unheard: list[str] = []
        for name in silent:
            if name not in self.expected:
                continue
            since = self.unheard_since.setdefault(name, now)
            (awaited if now - since < wait else unheard).append(name)
        return awaited, unheard

    @property
    def judging_here(self) -> bool:
        """Whether a process of this daemon watched by the guard may still judge it: one
        not past its window without a report of what the guard reads (``unjudged``)."""
        return any(client not in self.unjudged for client in self.started)

    def unjudged_text(self, unjudged: list[str]) -> str:
        """For an outcome's reason: the processes (``unjudged``, by name) whose window
        ended with no report of what the guard reads."""
        metrics = ", ".join(sorted(self.guard.metrics))
        names = some_names(unjudged, _LEFT_NAMED)
        whose = "its window" if len(unjudged) == 1 else "their windows"
        return f"{names} reported no {metrics} in the {self.record.window} steps of {whose}"

    def unheard_text(self, unheard: list[str], wait: float) -> str:
        """For a passed outcome's reason: the processes (``unheard``, by name) it passed
        without, after waiting ``wait`` seconds for their first report since the change."""
        metrics = ", ".join(sorted(self.guard.metrics))
        names = some_names(unheard, _LEFT_NAMED)
        return f"{names} applied it but reported no {metrics} within {wait:g} s"

    def unseen_text(self, unseen: list[str], wait: float) -> str:
        """For a passed outcome's reason: the processes (``unseen``, by name) that reported
        what the guard reads before the change and had no status entry for ``wait``
        seconds (they left, or their daemon was away: it restarted, say)."""
        metrics = ", ".join(sorted(self.guard.metrics))
        names = some_names(unseen, _LEFT_NAMED)
        return (
            f"{names} reported {metrics} before the change, then had no status entry for "
            f"{wait:g} s (it left, or its daemon was away)"
        )

    def departures(self) -> list[dict[str, Any]]:
        """The processes that left before the end of their window, by name."""
        return [self.left[name] for name in sorted(self.left)]

    def departures_text(self, left: list[dict[str, Any]]) -> str:
        """``left`` for a reason: who left when, and with how many failures in a row."""
        window, patience = self.record.window, self.record.patience
        parts = []
        for gone in left[:_LEFT_NAMED]:
            step = gone["step"]
            if step is None or not gone["reported"]:
                names = ", ".join(sorted(self.guard.metrics))
                text = f"{gone['client']} left before reporting {names}"
            else:
                text = (
                    f"{gone['client']} left at step {step}, {step - gone['from']} of its "
                    f"{window} steps in"
                )
            if gone["failures"]:
                text += (
                    f", with {gone['failures']} failed report(s) in a row recorded "
                    f"(patience {patience})"
                )
            parts.append(text)
        if len(left) > _LEFT_NAMED:
            parts.append(f"and {len(left) - _LEFT_NAMED} more left before their window ended")
        return "; ".join(parts)
