"""What a daemon's guards know of its own connected processes: which state each acknowledged.

A guard watches a process only if it applied the guarded change (revision R): it ran a
state from before R, then acknowledged one of revision ≥ R (``guards``'s docstring).
That, and whether a process not yet at R may still apply it or never will (the change
altered no value in force for it), follows from each process's recent acknowledgements
alone, whatever the guard: they are kept here, one set for all the guards of the daemon.

The guard manager (``guards.py``) tells this what the processes say; the looks at a guard
as a whole (``guard_passing``, ``guard_abandoning``) ask it about this daemon's processes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .armed_guard import ArmedGuard
from .status_entries import status_name

_ACKS_KEPT = 64


class ConnectedProcesses:
    """The processes connected to this daemon (``node``), by client name. Changed only on
    the daemon's loop."""

    def __init__(self, *, node: str, revision_of: Callable[[int], int | None]) -> None:
        self.node = node
        # Each process's acknowledgements: (revision, step, version). ``revision_of`` gives
        # the etcd revision whose configuration a version is now: later than the one it was
        # built at once an etcd revision changed no value in force (``unchanged_for``).
        self.acks: dict[str, deque[tuple[int, int, int | None]]] = {}
        self._revision_of = revision_of
        # Connected, but what they applied is unknown here (acknowledged with a version of
        # a daemon before this one: a restart that did not keep its versions).
        self.unknown: set[str] = set()
        # Every process connected here that acknowledged or reported something: whose
        # status entries are this daemon's own (``status._others``), whatever their node.
        self.clients: set[str] = set()

    def applied(self, client: str, revision: int | None, step: int, version: int | None) -> None:
        """``client`` acknowledged a state of ``revision`` at ``step`` (None: of a state whose
        revision is unknown here)."""
        self.clients.add(client)
        if revision is None:
            self.unknown.add(client)
            return
        self.unknown.discard(client)
        self.acks.setdefault(client, deque(maxlen=_ACKS_KEPT)).append((revision, step, version))

    def left(self, client: str) -> None:
        self.acks.pop(client, None)
        self.unknown.discard(client)
        self.clients.discard(client)

    def applied_at(self, active: ArmedGuard, client: str) -> int | None:
        """The step at which ``client`` applied the change: its first acknowledgement of a
        state of revision ≥ R after running one before R (acknowledged on this connection,
        or listed in the record: see ``guards``'s docstring); None if it never did."""
        ran_before = status_name(self.node, client) in active.before
        for revision, step, _ in self.acks.get(client, ()):
            if revision < active.revision:
                ran_before = True
            elif ran_before:
                return step
        return None

    def mine(self) -> set[str]:
        """This daemon's connected processes, by name: the status entries it writes. Another
        daemon of the app may have the same node name (on one host, by default)."""
        return {status_name(self.node, c) for c in self.clients}

    def watched_here(self, active: ArmedGuard) -> bool:
        """Whether a process of this daemon is watched, or listed in the record and
        connected with a state this daemon does not know (it applies this daemon's at its
        next step)."""
        if active.judging_here:
            return True
        return any(status_name(self.node, c) in active.before for c in self.unknown)

    def behind(self, active: ArmedGuard) -> list[str]:
        """The connected processes of this daemon last seen applying a state from before
        the change that may still apply it at their next step: the change altered a value
        in force here (``unchanged_for``)."""
        return [
            c
            for c, acks in self.acks.items()
            if acks and acks[-1][0] < active.revision and not self.unchanged_for(c, active)
        ]

    def unchanged_for(self, client: str, active: ArmedGuard) -> bool:
        """Whether ``client``, last seen applying a state from before the change, runs the
        change's configuration with that state: the change altered no value in force on
        this daemon (its values were already in force, or a higher layer holds its keys),
        so no new state comes for it."""
        acks = self.acks.get(client)
        if not acks:
            return False
        revision, _, version = acks[-1]
        if revision >= active.revision or version is None:
            return False
        now = self._revision_of(version)
        return now is not None and now >= active.revision
