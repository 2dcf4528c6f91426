"""``set --wait``: wait until the app's processes run a revision, read from their status.

Each daemon publishes one status entry per connected process (``status.py``): the etcd
revision whose configuration the process applied (``revision``) and, when the daemon
rejected a later etcd revision, that one and why (``rejected``). A written change has
reached a process once its entry's revision is the written one or later (a later
revision holds it, or a revert of it: either way the process runs what etcd says
now); a process whose daemon rejected it will not run it, however long one waits.
The entries are read once and then followed with a watch (``WatchedEntries``: on a
hundred nodes a read of them all is half a megabyte, a watch sends what changes), until
every process has one or the other, or the time is up. A process that appears
meanwhile is waited for too (it connected and runs the newest state); one whose entry
vanishes (it left, or its daemon did) is no longer waited for, and is named. With no
entry at all (no process connected, or its daemon restarting) nothing has applied it: the
wait goes on until one appears, or the time is up, and fails then.

A process seen rejecting it stays rejected for the rest of the wait: its daemon's refusal
lasts only while etcd holds the value it refused, so a revert (a guard's, within a second)
clears it, and that process, then at the revert's revision, never ran the change. A
refusal cleared before any entry said it (entries are written at most every 0.2 s: a
tuner writes ``1.5`` and then ``0.5``) is in the entries still, in ``rejected_before``:
the runs of refusals its daemon has cleared since, by key.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from hotknob.config.errors import HotknobError
from hotknob.config.keys import status_prefix
from hotknob.config.schema import restart_only_written

from .etcd_store import EtcdStore, WatchItem
from .guard_display import some_names
from .status_entries import (
    agreed_rank,
    agreed_text,
    is_int,
    is_time,
    refusal,
    status_entries,
    waiting_for_restart,
)

Entries = Mapping[str, Mapping[str, Any]]


class NotApplied(HotknobError):
    """The change was written, but not every process took it in time (exit 1)."""

    exit_code = 1


@dataclass
class Applied:
    """Where the processes stand with revision ``revision``, by ``<node>/<client>`` name."""

    revision: int
    applied: dict[str, Any] = field(default_factory=dict)  # name -> the step it applied at
    rejected: dict[str, str] = field(default_factory=dict)  # name -> its daemon's reason
    # Of those that run it, the ones whose apply raised (a binding refused a value, a
    # callback failed): name -> the first error. They may not run it as meant.
    failed: dict[str, str] = field(default_factory=dict)
    behind: dict[str, Any] = field(default_factory=dict)  # name -> the revision it runs
    # Of those behind, the ones that hold it unapplied (``pending``): name -> since when.
    holding: dict[str, float] = field(default_factory=dict)
    # Of those that applied it, the ones that run some of its restart-only keys as they
    # started (held back by the daemon, or by the process): name -> those keys.
    restart: dict[str, list[str]] = field(default_factory=dict)
    # Of those that applied it or are behind, the ranks of a torch.distributed group that
    # run the values the ranks agreed on, another rank's, in place of their daemon's (the
    # nodes' local layers differ): name -> that rank. One behind is not holding it.
    agreed: dict[str, int] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Of those that applied it, the revision each runs (the written one or later).
    runs: dict[str, int] = field(default_factory=dict)
    # The written keys that a later write changed again, as the revision some process of
    # ``applied`` runs holds them (``settled``): key -> that write's revision (None: it
    # deleted them). Those processes run that write's values, not this change's.
    overwritten: dict[str, int | None] = field(default_factory=dict)
    overtaken: list[str] = field(default_factory=list)  # those processes

    @property
    def nobody(self) -> bool:
        """No process has a status entry: none is there to apply it."""
        return not (self.applied or self.failed or self.rejected or self.behind)

    @property
    def done(self) -> bool:
        """Nothing left to wait for: every process applied it, or its daemon rejected it
        (and there is one)."""
        return not self.behind and not self.nobody

    @property
    def ok(self) -> bool:
        """Every process applied it, with no error, and runs it (none did if there is none:
        ``nobody``)."""
        return not self.behind and not self.rejected and not self.failed and not self.overtaken

    def as_dict(self) -> dict[str, Any]:
        return {
            "applied": sorted(self.applied),
            "rejected": dict(sorted(self.rejected.items())),
            "failed": dict(sorted(self.failed.items())),
            "behind": sorted(self.behind),
            "holding": sorted(self.holding),
            "restart": sorted(self.restart),
            "agreed": dict(sorted(self.agreed.items())),
            "left": sorted(self.left),
            "overwritten": dict(sorted(self.overwritten.items())),
            "overtaken": sorted(self.overtaken),
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        """One line, once all took it (``ok``): how many, in how long, who left meanwhile."""
        count = len(self.applied)
        took = "the only process" if count == 1 else f"all {count} processes"
        shown = f"{self.seconds:.2f}" if self.seconds < 1 else f"{self.seconds:.1f}"
        text = f"applied by {took} within {shown} s"
        if self.left:
            text += f" ({some_names(self.left)} left meanwhile)"
        if self.restart:
            keys = ", ".join(sorted({key for held in self.restart.values() for key in held}))
            waiting = len(self.restart)
            whom = "it" if count == 1 else f"{waiting} of them ({some_names(self.restart)})"
            text += f"; {keys} restart-only: waits for a restart of {whom}"
        if self.agreed:
            text += "; " + some_names([f"{n} {agreed_text(r)}" for n, r in self.agreed.items()])
        return text

    def overwritten_text(self) -> str:
        """Why some processes at its revision or later do not run the change, in one
        line's part: another write changed some of its keys again since."""
        changes = [
            f"{key} (deleted it)" if at is None else f"{key} (again, at revision {at})"
            for key, at in sorted(self.overwritten.items())
        ]
        total = len(self.applied)
        look = "hotknob history" if len(changes) > 1 else f"hotknob history {min(self.overwritten)}"
        return (
            f"a later write changed {', '.join(changes)}: {len(self.overtaken)} of {total} "
            f"processes ({some_names(self.overtaken)}) run its values, not this change's "
            f"(`{look}`)"
        )

    def failure(self, timeout: float, now: float | None = None) -> str:
        """Why the wait failed, in one line (the change stays written); ``now``: the wall
        time, for how long a process has held the change unapplied."""
        now = time.time() if now is None else now
        if self.nobody:
            left = f" ({some_names(self.left)} left meanwhile)" if self.left else ""
            return (
                f"revision {self.revision} is written, but no process is connected to a daemon "
                f"of the app (no status entry within {timeout:g} s){left}, so none applied it: "
                "see `hotknob status`"
            )
        total = len(self.applied) + len(self.failed) + len(self.rejected) + len(self.behind)
        parts = []
        if self.failed:
            error = min(self.failed.items())[1]
            parts.append(
                f"applied with an error by {len(self.failed)} of {total} processes "
                f"({some_names(self.failed)}): {error}"
            )
        if self.rejected:
            reason = min(self.rejected.items())[1]
            parts.append(
                f"rejected by the daemon of {len(self.rejected)} of {total} processes "
                f"({some_names(self.rejected)}): {reason}"
            )
        if self.behind:
            shown = some_names([self._behind_text(n, r, now) for n, r in self.behind.items()])
            parts.append(
                f"not applied within {timeout:g} s by {len(self.behind)} of {total} "
                f"processes: {shown}"
            )
            if self.holding and len(self.holding) == len(self.behind):
                who = "it" if len(self.behind) == 1 else "each of them"
                parts[-1] += (
                    f"; the change was sent to {who}, to be taken at the next apply (a long "
                    "step, a server with no requests, or a hung process): wait longer, or "
                    "see `hotknob status`"
                )
        if self.overtaken:
            parts.append(self.overwritten_text())
        # Not counted in the total above: a process that exited, or one whose daemon died
        # (it runs what it ran before, unseen until that daemon is back).
        if self.left:
            parts.append(f"{some_names(self.left)} left meanwhile")
        return f"revision {self.revision} is written, but " + "; ".join(parts)

    def _behind_text(self, name: str, runs: Any, now: float) -> str:
        rank = self.agreed.get(name)
        if rank is not None:
            return f"{name} (at revision {runs}; {agreed_text(rank)})"
        since = self.holding.get(name)
        if since is None:
            return f"{name} (at revision {runs})"
        held = max(0.0, now - since)
        return f"{name} (at revision {runs}; sent it, nothing applied for {held:.0f} s)"


def classify(
    entries: Entries,
    revision: int,
    into: Applied,
    keys: Collection[str] = (),
    seen_rejected: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Sort the processes of ``entries`` by where they stand with ``revision``, which
    wrote ``keys`` (none given: judged by revisions alone).

    A process whose daemon refused one of ``keys`` at ``revision`` or later runs without
    it whatever revision it runs (the daemon took a later change of another key, or a
    full read of etcd at a later revision dropped it): rejected. So is one whose daemon
    refused ``revision`` for one of ``keys`` and has cleared that since (a later revision
    it took edited the key: ``rejected_before``), and one that an earlier look found
    rejecting it (``seen_rejected``: name -> reason), whatever its entry says now.
    Otherwise one that runs ``revision`` or later applied it, and one behind it whose
    daemon refused ``revision`` itself (or, with no ``keys``, a later one) will not run
    it either; one whose daemon refused only a later write of other keys is behind.

    Returns the processes whose daemon refused one of ``keys``: name -> its reason."""
    into.applied, into.rejected, into.behind, into.holding = {}, {}, {}, {}
    into.restart, into.failed, into.agreed, into.runs = {}, {}, {}, {}
    refusing: dict[str, str] = {}
    for name, entry in entries.items():
        runs = entry.get("revision")
        rank = agreed_rank(entry)
        refused = refusal(entry.get("rejected"), revision)
        cleared = _refused_before(entry.get("rejected_before"), revision, keys)
        error = _first_error(entry)
        if refused is not None and _refuses_any(refused, keys):
            into.rejected[name] = refusing[name] = str(refused.get("reason", "no reason given"))
        elif cleared is not None:
            into.rejected[name] = refusing[name] = cleared
        elif seen_rejected and name in seen_rejected:
            into.rejected[name] = seen_rejected[name]
        elif is_int(runs) and runs >= revision and error is not None:
            # Its ack of what it runs said what raised (its binding or a callback refused
            # a value: the values before may still be in force there), so not applied.
            into.failed[name] = error
        elif is_int(runs) and runs >= revision:
            into.applied[name] = entry.get("step")
            into.runs[name] = runs
            if rank is not None:
                into.agreed[name] = rank
            waiting = sorted(restart_only_written(keys, waiting_for_restart(entry)))
            if waiting:
                into.restart[name] = waiting
        elif refused is not None and _refused_it(refused, revision, keys):
            into.rejected[name] = str(refused.get("reason", "no reason given"))
        else:
            into.behind[name] = runs if is_int(runs) else "-"
            holds = entry.get("pending")
            if rank is not None:
                into.agreed[name] = rank  # not hung: it runs the ranks' agreed values
            elif (
                isinstance(holds, Mapping)
                and is_int(holds.get("revision"))
                and holds["revision"] >= revision
                and is_time(holds.get("since"))
            ):
                into.holding[name] = holds["since"]
    return refusing


def _refused_it(refused: Mapping[str, Any], revision: int, keys: Collection[str]) -> bool:
    """Whether a refusal of a process behind, one that names none of ``keys``, keeps it
    from running the change at ``revision``: with no keys known, any refusal from there on
    does; else only one of that very revision (a rule across keys may name another key).
    One of a later revision refused another write (an operator's ``set`` of another key
    that this daemon's schema refuses): the daemon took this change, and the process runs
    it at its next apply."""
    return not keys or refused.get("revision") == revision


def _first_error(entry: Mapping[str, Any]) -> str | None:
    """The first of the errors the process's last ack carried (``{"error": ...}`` objects,
    with the ``key`` or ``binding`` that raised), if any."""
    errors = entry.get("errors")
    if not isinstance(errors, list) or not errors:
        return None
    first = errors[0]
    if not isinstance(first, Mapping):
        return str(first)
    where = first.get("key") or first.get("binding")
    text = str(first.get("error", "no reason given"))
    return f"{where}: {text}" if where else text


def _refuses_any(refused: Mapping[str, Any], keys: Collection[str]) -> bool:
    held = refused.get("keys")
    return isinstance(held, list) and any(key in held for key in keys)


def _refused_before(before: Any, revision: int, keys: Collection[str]) -> str | None:
    """Why the daemon refused etcd's ``revision`` for one of ``keys``, as a status entry's
    ``rejected_before`` says (by key, a run of refusals since cleared: ``since`` to
    ``revision``, every revision between them that edited the key refused, and the
    newest's ``reason``); None if it does not say so."""
    if not isinstance(before, Mapping):
        return None
    for key in keys:
        run = before.get(key)
        if not isinstance(run, Mapping):
            continue
        since, newest = run.get("since"), run.get("revision")
        if is_int(since) and is_int(newest) and since <= revision <= newest:
            return str(run.get("reason", "no reason given"))
    return None


def wait_applied(
    next_entries: Callable[[float], Entries],
    revision: int,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    keys: Collection[str] = (),
) -> Applied:
    """Follow the entries (``next_entries(wait)``: the current ones, once something
    changed or ``wait`` seconds passed) until every process runs ``revision`` (which
    wrote ``keys``) or later, or its daemon rejected it, or ``timeout`` seconds are up:
    where they stand then (``classify``; one seen rejecting it stays rejected)."""
    start = clock()
    result = Applied(revision)
    seen: set[str] = set()
    rejected: dict[str, str] = {}
    wait = 0.0
    while True:
        entries = next_entries(wait)
        gone = seen - entries.keys()
        result.left = sorted({*result.left, *gone} - entries.keys())  # unless back since
        seen |= entries.keys()
        rejected.update(classify(entries, revision, result, keys, rejected))
        result.seconds = clock() - start
        if result.done or result.seconds >= timeout:
            return result
        wait = timeout - result.seconds


class WatchedEntries:
    """An app's status entries, read once and kept current by a watch of their prefix.

    Call it with the seconds it may wait for a change (``wait_applied``'s
    ``next_entries``). The watch ends when ``store`` closes; an error it reports (etcd
    lost) is raised.
    """

    def __init__(self, store: EtcdStore, app: str) -> None:
        self._app = app
        self._prefix = status_prefix(app)
        kvs, read_at = store.read_prefix(self._prefix)
        self._entries = status_entries(app, kvs)  # each entry decoded once, when it changes
        self._changes: queue.SimpleQueue[WatchItem] = queue.SimpleQueue()
        store.watch_prefix(self._prefix, read_at + 1, self._changes.put)

    def __call__(self, wait: float) -> Entries:
        """The entries once something changed, or after ``wait`` seconds. What is queued is
        taken at once, up to an entry that says its daemon refused a change: given back
        then, before a later one (a revert's) can clear it."""
        try:
            item = self._changes.get(timeout=wait) if wait > 0 else self._changes.get_nowait()
            while not self._take(item):
                item = self._changes.get_nowait()
        except queue.Empty:
            pass
        return self._entries

    def _take(self, item: WatchItem) -> bool:
        """Take a watch answer; True if one of its entries holds a refusal."""
        if isinstance(item, HotknobError):
            raise item
        refusing = False
        for change in item:
            for key in [*change.deletes, *change.puts]:  # a put that is no entry drops it
                self._entries.pop(key[len(self._prefix) :], None)
            taken = status_entries(self._app, change.puts)
            self._entries.update(taken)
            refusing |= any(isinstance(e.get("rejected"), Mapping) for e in taken.values())
        return refusing
