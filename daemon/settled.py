"""After ``set``, ``unset`` or ``rollback`` wrote: ``--wait`` for the processes to run the
change and, for a guarded one, for the guard's verdict; what ``--json`` says of both; and
how the command ends (exit 0, or the error that says why not).

The change is written whatever happens here: an etcd lost meanwhile, a process behind, a
daemon that rejected it, another operator's write that changed its keys again before the
processes ran it, or a guard that reverted it are each said, never undone.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from hotknob.config import Unavailable
from hotknob.config.keys import config_prefix, etcd_key

from .etcd_store import CompactedError, EtcdStore, PrefixState
from .guard_records import PASSED, GuardRecord
from .wait_applied import Applied, NotApplied, WatchedEntries, wait_applied
from .wait_verdict import GuardVerdict, read_verdict, verdict_text, wait_verdict


@dataclass(frozen=True)
class Guarded:
    """The guard a ``set`` wrote beside its change: its record and its etcd key."""

    record: GuardRecord
    path: str


@dataclass
class Settled:
    """Where a written change stands once ``--wait`` is over: ``applied``, where every
    process stands (None without ``--wait``); ``judged``, the guard whose verdict was
    waited for (some process applied the change, and each of the others never will or
    did too), with ``verdict``, its record then (None: gone); ``unjudged``, the guard of a
    change that no process applied, so that nothing judged it in this wait."""

    written: int
    timeout: float
    applied: Applied | None = None
    judged: GuardRecord | None = None
    verdict: GuardRecord | None = None
    unjudged: GuardRecord | None = None


def settle(
    store: EtcdStore,
    app: str,
    written: int,
    keys: Collection[str],
    guarded: Guarded | None,
    timeout: float,
    quiet: bool,
) -> Settled:
    """``--wait`` (``timeout`` seconds; 0: no wait) for revision ``written``, which wrote
    ``keys``, then for the verdict of the guard written with it, if any, in the time
    left. Says how the wait went unless ``quiet`` (``--json`` has it in its object)."""
    settled = Settled(written, timeout)
    if not timeout:
        return settled
    applied = settled.applied = _wait(store, app, written, keys, timeout)
    if guarded is None:  # a guarded one's guard says if another write superseded it
        _find_overwritten(store, app, written, keys, applied)
    if applied.ok and not applied.nobody and not quiet:
        print(applied.summary())
    if guarded is None:
        return settled
    record = guarded.record
    # No process applied it (none is connected): nothing judges it in this wait.
    if applied.ok and not applied.applied:
        settled.unjudged = record
    # A guarded change is settled by its guard: its verdict, in the time left, once each
    # process applied it or never will (its daemon rejected it, or its apply raised) and
    # some did: the guard judges those. With none, nothing can judge it.
    if not applied.applied or applied.behind:
        return settled
    settled.judged = record
    if not applied.ok:  # said now: the fleet runs two configurations meanwhile
        print(
            f"hotknob: warning: {applied.failure(timeout)}; waiting for guard "
            f"{record.id}'s verdict where it applied",
            file=sys.stderr,
        )
    try:
        settled.verdict = wait_verdict(store, guarded.path, max(0.0, timeout - applied.seconds))
    except Unavailable as exc:  # etcd lost meanwhile: the change stays
        raise Unavailable(
            f"revision {written} is written and applied, but the wait for guard "
            f"{record.id}'s verdict failed: {exc}"
        ) from exc
    return settled


def json_fields(settled: Settled, store: EtcdStore, guarded: Guarded | None) -> dict[str, Any]:
    """What ``--json``'s object says of the wait (``wait``) and of the guard (``guard``,
    and with ``--wait`` its ``verdict``: the one waited for, else the guard as it is now,
    so that the object always has one)."""
    fields: dict[str, Any] = {}
    if guarded is not None:
        fields["guard"] = guarded.record.id
    if settled.applied is None:
        return fields
    fields["wait"] = settled.applied.as_dict()
    if settled.judged is not None:
        fields["verdict"] = _verdict_dict(settled.verdict)
    elif guarded is not None:
        fields["verdict"] = _verdict_now(store, guarded, settled.written)
    return fields


def finish(settled: Settled, quiet: bool) -> None:
    """End the command as the wait went: return (exit 0) if every process applied the
    change and, for a guarded one, the guard passed it; else raise the error that says
    why not (exit 1). Says the guard's verdict unless ``quiet``."""
    applied, judged, timeout = settled.applied, settled.judged, settled.timeout
    if applied is not None and not applied.ok:
        text = applied.failure(timeout)
        if judged is not None:
            text += "; where it applied, " + verdict_text(
                judged.id, settled.verdict, timeout, by_all=False
            )
        raise NotApplied(text)
    if settled.unjudged is not None:
        raise GuardVerdict(
            f"guard {settled.unjudged.id} is armed, but no process applied the change, so "
            "nothing judged it: it ends abandoned if none does (`hotknob status`)"
        )
    if applied is not None and applied.nobody:
        raise NotApplied(applied.failure(timeout))
    if judged is not None:
        text = verdict_text(judged.id, settled.verdict, timeout)
        if settled.verdict is None or settled.verdict.state != PASSED:
            raise GuardVerdict(text)
        if not quiet:
            print(text)


def _wait(
    store: EtcdStore, app: str, written: int, keys: Collection[str], timeout: float
) -> Applied:
    """``--wait``: until every process runs revision ``written``, which wrote ``keys``
    (``wait_applied``)."""
    try:
        return wait_applied(WatchedEntries(store, app), written, timeout, keys=keys)
    except Unavailable as exc:  # etcd lost meanwhile: the change stays written
        message = f"revision {written} is written, but the wait for it failed: {exc}"
        raise Unavailable(message) from exc


def _find_overwritten(
    store: EtcdStore, app: str, written: int, keys: Collection[str], applied: Applied
) -> None:
    """Of the processes that run revision ``written`` or later, those whose revision holds
    other values of its ``keys`` (another operator's ``set`` of the same key landed
    since: they run that one's values, whether or not they ran these in between):
    ``applied.overtaken``, and the keys, with the revision that last changed each,
    ``applied.overwritten``. A process runs etcd's state at its revision, so that state
    says whether this change is in force there. A state etcd compacted away cannot be
    compared: such a process counts as running it."""
    later = sorted({runs for runs in applied.runs.values() if runs > written})
    if not keys or not later:
        return
    prefix = config_prefix(app)
    try:
        then = store.read_prefix_state(prefix, written)
        for at in later:
            state = store.read_prefix_state(prefix, at)
            changed = {
                key: _last_change(state, etcd_key(app, key))
                for key in keys
                if _under(then, etcd_key(app, key)) != _under(state, etcd_key(app, key))
            }
            if changed:
                applied.overwritten.update(changed)
                applied.overtaken += [n for n, runs in applied.runs.items() if runs == at]
    except CompactedError:
        return
    except Unavailable as exc:  # etcd lost meanwhile: the change stays written
        message = f"revision {written} is written, but the wait for it failed: {exc}"
        raise Unavailable(message) from exc


def _under(state: PrefixState, path: str) -> dict[str, bytes]:
    """The values at ``path`` and below it (a section's keys) in ``state``."""
    return {k: v for k, v in state.values.items() if k == path or k.startswith(path + "/")}


def _last_change(state: PrefixState, path: str) -> int | None:
    """The revision that last changed a value at or below ``path`` in ``state``; None if
    there is none left (a later write deleted them)."""
    return max((state.mods[k] for k in _under(state, path)), default=None)


def _verdict_now(store: EtcdStore, guarded: Guarded, written: int) -> dict[str, Any]:
    """``--json``'s ``verdict`` of a guarded ``--wait`` that did not wait for it (no process
    applied the change, every daemon rejected it, or some process is behind): the guard
    as it is now."""
    try:
        return _verdict_dict(read_verdict(store, guarded.path))
    except Unavailable as exc:  # etcd lost meanwhile: the change stays
        raise Unavailable(
            f"revision {written} is written, but the read of guard {guarded.record.id} "
            f"failed: {exc}"
        ) from exc


def _verdict_dict(record: GuardRecord | None) -> dict[str, Any]:
    """``--json``'s ``verdict``: the guard's state then (``gone``: no record), and its
    outcome once it ended."""
    if record is None:
        return {"state": "gone"}
    return {"state": record.state, "outcome": record.outcome or {}}
