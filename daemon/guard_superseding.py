"""Ending a guard ``superseded``: its keys were written again after the change it guards.

Such a guard would judge a value no longer in etcd (another ``set``, an ``unset``, a
``rollback``, an ``etcdctl put``), so it ends ``superseded`` as soon as the write is seen,
rather than at its verdict. The write is found three ways: among the changes of the config
watch while the guard is armed (``on_config_changes``), by the mod revisions of its keys
after the config watch read etcd in full (``on_full_read``: what it missed came as values),
and once when the guard is armed (``written_since``: the write may have come before).

This is about the guarded keys in etcd, not about the processes and their reports: it is
apart from the guard manager (``guards.py``), which arms the guards and hands their ending
to ``GuardEnding``, whose transaction also checks the keys, so a write missed here still
keeps a stale revert out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from typing import Any

from hotknob.config.keys import etcd_key, key_from_etcd

from .armed_guard import ArmedGuard
from .etcd_store import EtcdChange
from .guard_records import SUPERSEDED


class Superseding:
    """Finds the armed guards (``active``, the manager's, by id) whose keys were written
    since their change, and ends them (``finish``: ``GuardEnding.finish``).

    Mod revisions are read on the manager's worker (``submit``, ``mod_revision``) when
    etcd is there to read (``etcd_there``), and the answer comes back on the loop
    (``then``); nothing is ended once the daemon stops (``stopped``).
    """

    def __init__(
        self,
        *,
        app: str,
        log: Any,
        active: Mapping[str, ArmedGuard],
        finish: Callable[[str, ArmedGuard, str, dict[str, Any]], None],
        submit: Callable[[Callable[[], Any]], Future[Any]],
        mod_revision: Callable[[str], int],
        then: Callable[..., None],
        etcd_there: Callable[[], bool],
        stopped: Callable[[], bool],
    ) -> None:
        self.app = app
        self.log = log
        self._active = active
        self._finish = finish
        self._submit = submit
        self._mod_revision = mod_revision
        self._then = then
        self._etcd_there = etcd_there
        self._stopped = stopped

    def on_config_changes(self, changes: Collection[EtcdChange]) -> None:
        """On the loop, after the engine had ``changes``: a guard whose keys one of them
        wrote (another ``set``, an ``unset``, a ``rollback``, an ``etcdctl put``) judges a
        value no longer in etcd, and ends ``superseded`` now rather than at its verdict.
        Every daemon of the app tries; the ending's transaction lets one of them."""
        for guard_id, active in list(self._active.items()):
            if active.busy:  # ending already (its own revert is one of these changes)
                continue
            for change in changes:
                if change.revision <= active.revision:
                    continue
                written = {
                    key_from_etcd(self.app, path) for path in (*change.puts, *change.deletes)
                }
                hit = {key: change.revision for key in active.record.keys if key in written}
                if hit:
                    self._supersede(guard_id, active, hit)
                    break

    def on_full_read(self) -> None:
        """On the loop, after the config watch read etcd in full: the writes it missed
        (compacted away while it was stopped, or etcd restarted) came as values, not as
        changes, so a guard whose keys one of them wrote is found by their mod revisions
        (``written_since``), and ends ``superseded`` now rather than at its verdict."""
        for active in list(self._active.values()):
            if not active.busy:
                self.written_since(active)

    def _supersede(self, guard_id: str, active: ArmedGuard, hit: Mapping[str, int]) -> None:
        """End the guard ``superseded``: its keys ``hit`` were written since (at the revision
        each maps to; 0: deleted, at a revision not known here)."""
        said = [
            f"{key} at revision {revision}" if revision else f"{key} deleted"
            for key, revision in sorted(hit.items())
        ]
        outcome = {
            "reason": (
                f"the guarded keys were changed since ({', '.join(said)}): the guard judges "
                "them no more"
            ),
            "changed": {etcd_key(self.app, key): revision for key, revision in hit.items()},
        }
        self._finish(guard_id, active, SUPERSEDED, outcome)

    def written_since(self, active: ArmedGuard) -> None:
        """Once armed: whether the guarded keys were written after the change already. Such
        a write is seen by ``on_config_changes`` only while the guard is armed here, and
        it may have come before: while this daemon was down (it reads the record back at
        its start), or on the config watch ahead of the record on the guard watch."""
        if not self._etcd_there():
            return  # driven by hand, with no etcd: the ending's transaction checks them
        keys = sorted(active.record.keys)
        future = self._submit(
            lambda: {key: self._mod_revision(etcd_key(self.app, key)) for key in keys}
        )
        self._then(future, self._written_since_read, active.record.id, active)

    def _written_since_read(
        self, guard_id: str, active: ArmedGuard, result: Mapping[str, int] | BaseException
    ) -> None:
        if self._stopped() or self._active.get(guard_id) is not active or active.busy:
            return
        if isinstance(result, BaseException):  # the ending's transaction still checks them
            self.log.warning("guard_check_failed", guard=guard_id, error=str(result))
            return
        # A key absent now (mod revision 0) was deleted since: the change had written it.
        hit = {k: r for k, r in result.items() if r > active.revision or r == 0}
        if hit:
            self._supersede(guard_id, active, hit)
