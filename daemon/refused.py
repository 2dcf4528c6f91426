"""The etcd values a daemon refused and still runs without: the ``rejected`` field of its
processes' status entries; and those it refused and has cleared since: their
``rejected_before`` field.

A rejected etcd revision changes nothing, and the daemon goes on taking later revisions
for other keys: the refused value stays in etcd, and this daemon runs the value it had.
So a refusal lasts until a later revision that this daemon takes edits those keys again
(a put or a delete), or until a full read of etcd takes them, not until the next
revision it takes: an edit of ``train.lr`` does not make a node that refused
``sampling.temperature=1.5`` run what etcd says. ``status`` and ``set --wait``, run
elsewhere, read it from the status entries.

A refusal cleared is kept, for the keys cleared most recently (``KEEP_CLEARED``): status
entries are published at most every 0.2 s, so a refusal and the revision that clears it
may both come before the next one is written (a tuner writes ``1.5`` and then ``0.5``),
and ``set --wait`` for the refused revision would then see the process run a later
revision with no ``rejected`` field: applied, though it never ran the value. What is
kept, per key, is a run of refusals: the first refused revision since the key last ran
what etcd said, the newest, and why; every revision between them that edited the key
was refused here, none taken.

Called by the daemon under the lock it holds around the engine (from the loop, or the
etcd watch thread for a change that comes alone); ``newest`` and ``cleared`` may be read
from any thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

from hotknob.config.keys import key_from_etcd

from .table import cut

REASON_CHARS = 500
"""The longest reason a status entry carries: it says why, not all of it."""

KEEP_CLEARED = 16
"""How many keys' cleared refusals are kept (the keys cleared most recently): each is in
every status entry of the daemon, written at every ack."""

CLEARED_REASON_CHARS = 200
"""The longest reason kept of a cleared refusal: ``set --wait`` says it in one line."""


@dataclass(frozen=True)
class _Run:
    """Refusals of one key in a row: etcd's revisions ``since`` to ``revision`` (the newest,
    refused for ``reason``), with no revision that edited the key taken between them."""

    since: int
    revision: int
    reason: str

    def field(self) -> dict[str, Any]:
        """What a status entry says of it once cleared (``rejected_before``)."""
        reason = cut(self.reason, CLEARED_REASON_CHARS)
        return {"since": self.since, "revision": self.revision, "reason": reason}


def _first(item: tuple[str, _Run]) -> str:
    return item[0]


class RefusedKeys:
    """Per dotted key, the etcd revisions whose value for it this daemon refused, and why:
    those in force, and those cleared since."""

    def __init__(self, app: str) -> None:
        self._app = app
        self._keys: dict[str, _Run] = {}  # in force
        # Ended by the event being taken now (``_ending_at``: a taken revision, or a full
        # read's, None until its first refusal gives it if the read did not), which may
        # refuse the same keys again: the run goes on then. A change that comes alone is
        # cleared of its keys' refusals before the engine judges it (``taken``, then
        # ``refused``), and a full read clears every refusal before it says again what it
        # refuses. In a group, the daemon takes the revisions before each refusal first.
        self._ending: dict[str, _Run] = {}
        self._ending_at: int | None = None
        self._cleared: dict[str, _Run] = {}  # ended for good, the one ended last at the end
        # The newest revision of a run in ``_cleared`` (or more): ``taken`` of a revision
        # at or past it, with nothing in force or ending, can change nothing.
        self._top = 0
        self.newest: dict[str, Any] | None = None
        """The newest refusal still in force: ``revision``, ``reason``, and ``keys``, every
        key still refused (by any revision); None if none is. Replaced whole on a change."""
        self.cleared: dict[str, dict[str, Any]] = {}
        """The refusals cleared since, by key, of the ``KEEP_CLEARED`` keys cleared most
        recently: ``since`` and ``revision``, the first and the newest revision of the
        run of refusals, and ``reason``, the newest's. Replaced whole on a change."""

    def __bool__(self) -> bool:
        """Whether anything is held: a refusal in force, which a revision taken may clear
        (``taken``), or one cleared, which a revision may show stale (``_went_back``)."""
        return bool(self._keys or self._ending or self._cleared)

    def refused(self, revision: int, reason: str, keys: Iterable[str]) -> bool:
        """Etcd's ``revision`` was rejected: its ``keys`` keep the values in force. True
        if ``newest`` or ``cleared`` changed."""
        went_back = self._went_back(revision)
        if self._ending_at is not None and self._ending_at != revision:
            self._settle()  # not the event that ended them: they stay cleared
        self._ending_at = revision  # a full read's refusals come all at its revision
        text = cut(reason, REASON_CHARS)
        for key in keys:
            run = self._keys.get(key) or self._ending.pop(key, None)
            since = revision if run is None else run.since
            self._keys[key] = _Run(since, revision, text)
        return self._update() or went_back

    def taken(self, revision: int, paths: Iterable[str]) -> bool:
        """Etcd's ``revision``, which edited ``paths``, was not rejected: the keys it edited
        run what etcd says now (a refusal of this same revision stays). True if
        ``newest`` or ``cleared`` changed."""
        if not self._keys and not self._ending and revision >= self._top:
            # Every lone change once a refusal was cleared comes here (the daemon asks
            # while anything is held): it must cost about what a check did before.
            self._ending_at = revision
            return False
        went_back = self._went_back(revision)
        self._settle()
        self._ending_at = revision
        ended = False
        if self._keys:
            for path in paths:
                key = key_from_etcd(self._app, path)
                run = self._keys.get(key) if key is not None else None
                if key is not None and run is not None and run.revision < revision:
                    del self._keys[key]
                    self._ending[key] = run
                    ended = True
        # Nothing ended nor forgotten (every change, once a refusal was cleared): what the
        # entries say is the same, and is not made again.
        return (ended or went_back) and self._update()

    def clear(self, revision: int | None = None) -> bool:
        """A full read of etcd at ``revision``: what it refuses is said again (``refused``,
        at that revision) as it is read; the rest is cleared. What was cleared before
        stays, unless the read is below it (etcd restored from a backup: ``_went_back``).

        The read is the event that ends the runs it does not say again: a refusal at
        another revision that comes next (a change of the key refused in a group, before
        any revision is taken) starts a new run, since the read took the key. None: the
        revision is not known; the read's first refusal gives it."""
        self._settle()
        self._ending, self._keys = self._keys, {}
        self._ending_at = revision
        # Forgotten now, not at the next change: the entries written for what the read
        # changes would carry them, and a ``set --wait`` of that next change, whose
        # revision may fall among them, would read it as refused.
        went_back = revision is not None and self._went_back(revision)
        return self._update() or went_back

    def _settle(self) -> None:
        """The event that ended the runs in ``_ending`` is over: they are cleared for good."""
        for key, run in self._ending.items():
            self._cleared.pop(key, None)
            self._cleared[key] = run
            self._top = max(self._top, run.revision)
        for key in list(self._cleared)[: max(0, len(self._cleared) - KEEP_CLEARED)]:
            del self._cleared[key]
        self._ending = {}

    def _went_back(self, revision: int) -> bool:
        """Forget the cleared runs that etcd's ``revision`` shows stale: one below the newest
        revision of a cleared run means that etcd was restored from a backup and counts on
        from there, so those revisions will name other changes. (Revisions come in order,
        and a run ends only at ``taken`` or a full read.) True if any was forgotten."""
        runs = chain(self._ending.values(), self._cleared.values())
        if all(run.revision <= revision for run in runs):
            return False
        for held in (self._ending, self._cleared):
            for key in [k for k, run in held.items() if run.revision >= revision]:
                del held[key]
        self._top = max((run.revision for run in self._cleared.values()), default=0)
        return True

    def _update(self) -> bool:
        newest: dict[str, Any] | None = None
        if self._keys:
            run = max(self._keys.values(), key=lambda run: run.revision)
            newest = {"revision": run.revision, "reason": run.reason, "keys": sorted(self._keys)}
        ended = [(k, run) for k, run in self._cleared.items() if k not in self._ending]
        ended += self._ending.items()
        cleared = {key: run.field() for key, run in sorted(ended[-KEEP_CLEARED:], key=_first)}
        changed = newest != self.newest or cleared != self.cleared
        self.newest = newest
        self.cleared = cleared
        return changed


class ReportedValues:
    """The raw etcd values, by dotted key, that this daemon refused and reported and that no
    revision it has seen since edited. A full read that refuses one of them again (a resync
    after a compaction) is no new bad write, and is not reported again (``Engine``'s
    ``_merge_sanitized``): watchers and the log would take it for one. Under the daemon's
    lock, as the engine is."""

    def __init__(self, app: str) -> None:
        self._app = app
        self._raw: dict[str, bytes | str] = {}

    def edited(self, paths: Iterable[str]) -> None:
        """A revision put or deleted ``paths``: what it wrote there is new, refused or not."""
        if self._raw:
            for path in paths:
                self._raw.pop(key_from_etcd(self._app, path) or "", None)

    def refused(self, puts: Mapping[str, bytes]) -> None:
        """A revision with ``puts`` was refused whole and reported."""
        for path, raw in puts.items():
            key = key_from_etcd(self._app, path)
            if key is not None:
                self._raw[key] = raw

    def repeated(self, values: Mapping[str, bytes | str | None]) -> bool:
        """Whether ``values`` (raw, by key; None: not read) are all values reported before."""
        return bool(values) and all(
            v is not None and self._raw.get(key) == v for key, v in values.items()
        )

    def replace(self, values: Mapping[str, bytes | str]) -> None:
        """After a full read: what it refused is what stays reported."""
        self._raw = dict(values)

    def forget(self) -> None:
        """etcd restored from a backup: its values were written again, in another history."""
        self._raw = {}
