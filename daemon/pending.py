"""Which processes hold a state they have not applied: the ``pending`` field of their
status entries.

A process applies what its daemon sends at its next ``apply`` call: at once in a loop of
short steps, but only after a step of a minute in a large model's training, and never
while an inference server that applies per request has no requests. ``status`` and
``set --wait``, run elsewhere, then see a process that does not run the written revision,
and cannot tell it from one whose daemon never sent it. So a daemon looks at its
clients every ``CHECK_EVERY_S``: a process that was sent a version later than the one it
last acknowledged, or that has acknowledged none since it connected (a process whose
daemon restarted while a value changed reconnects to a state it does not run, and acks
it only at its next ``apply``), at two looks in a row (so at least ``CHECK_EVERY_S`` ago:
a process that applies within a second writes no extra entry), gets ``pending``: the
etcd revision of the newest state sent to it, and since when it has held a state
unapplied (wall time, from the first look that saw it). Its next acknowledgement clears
it.

The looks cost nothing on a change's way: they read what the socket server already
keeps, on the event loop, once a second.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

CHECK_EVERY_S = 1.0


@dataclass(frozen=True)
class Sent:
    """The newest state a process was sent: its version and etcd revision."""

    client: str
    version: int
    revision: int


class PendingStates:
    """The processes seen holding a state they have not applied, by client name."""

    def __init__(self) -> None:
        self._behind: dict[str, float] = {}  # name -> when a look first saw it behind
        self._shown: dict[str, dict[str, Any]] = {}  # name -> its entry's ``pending``

    def look(self, sent: Iterable[Sent], acknowledged: Mapping[str, int], now: float) -> set[str]:
        """Compare what was sent to each process with the version it last acknowledged
        (a process not in ``acknowledged`` has acknowledged nothing since it connected:
        whatever it was sent, it has not applied); return the names whose ``pending``
        field changed."""
        changed: set[str] = set()
        behind: dict[str, float] = {}
        for s in sent:
            acked = acknowledged.get(s.client)
            if acked is not None and s.version <= acked:
                continue
            first_seen = self._behind.get(s.client)
            behind[s.client] = now if first_seen is None else first_seen
            if first_seen is None:
                continue  # maybe about to apply: seen again at the next look, it is shown
            field = {"revision": s.revision, "since": first_seen}
            if self._shown.get(s.client) != field:
                self._shown[s.client] = field
                changed.add(s.client)
        for name in [n for n in self._shown if n not in behind]:
            del self._shown[name]
            changed.add(name)
        self._behind = behind
        return changed

    def field(self, client: str) -> dict[str, Any] | None:
        """``client``'s ``pending`` field, if a look found it holding a state unapplied."""
        return self._shown.get(client)

    def forget(self, client: str) -> None:
        """``client`` acknowledged a state (whatever it holds now is looked at afresh), or
        left."""
        self._behind.pop(client, None)
        self._shown.pop(client, None)
