"""Ending a guard: its outcome and, for a revert, the old values, in one etcd transaction.

A guard ends ``passed``, ``reverted``, ``blocked``, ``superseded`` or ``abandoned`` (the
guard manager, ``guards.py``, decides which and when). The ending is written in one
transaction that holds only if the record and the guarded keys are still at the
guarded revision: so it lands once across the daemons of the app, and a revert only if
nobody changed those keys since (else the guard ends ``superseded``). A revert restores
exactly the changed keys, checked first against the configuration in force as ``set``
checks a change (``revert_plan``): one the daemon would reject is not written, and the
guard ends ``blocked``. Once written, the ending is logged and sent to ``watch`` clients
(``change_reverted``, ``guard_passed``, ...), with secret values masked.

The etcd call runs on the manager's worker thread (``commit``); its result comes back
on the event loop (``then``), where everything else here runs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

from pydantic import BaseModel

from hotknob.config import InvalidChange, Layer
from hotknob.config.keys import etcd_key, meta_key, to_text
from hotknob.config.secrecy import secret_keys

from .announce import EventSink
from .armed_guard import ArmedGuard
from .etcd_checks import revert_plan
from .etcd_store import ConflictError
from .guard_display import hidden_keys, masked_if
from .guard_records import (
    ABANDONED,
    BLOCKED,
    REVERTED,
    SUPERSEDED,
    GuardRecord,
    KeyChange,
    guard_key,
)

_OUTCOME_LOGGED_APART = frozenset({"revision", "time", "node"})

Commit = Callable[[dict[str, str], list[str], dict[str, int]], "Future[int]"]
Then = Callable[..., None]


class ConfigInForce(Protocol):
    @property
    def schema(self) -> type[BaseModel]: ...

    @property
    def precedence(self) -> tuple[str, ...]: ...

    @property
    def layers(self) -> Mapping[str, Layer]: ...


class GuardEnding:
    """Writes guards' endings for one daemon's ``GuardManager``.

    ``commit(puts, deletes, expect_mod_revisions)`` runs an etcd transaction on the
    worker; ``then(future, fn, *args)`` calls ``fn(*args, result)`` on the loop;
    ``ended(guard_id)`` tells the manager to stop watching a guard; ``stopped()`` is
    True once the daemon stops (no guard ends from then on). ``config`` gives the
    configuration in force, which a revert is validated against (None: written as
    recorded).
    """

    def __init__(
        self,
        *,
        app: str,
        node: str,
        log: Any,
        broadcast: EventSink,
        commit: Commit,
        then: Then,
        ended: Callable[[str], object],
        stopped: Callable[[], bool],
        config: Callable[[], ConfigInForce | None] | None = None,
    ) -> None:
        self.app = app
        self.node = node
        self.log = log
        self._broadcast = broadcast
        self._commit = commit
        self._then = then
        self._ended = ended
        self._stopped = stopped
        self._config = config

    def revert(
        self, guard_id: str, active: ArmedGuard, reason: str, evidence: list[dict[str, Any]]
    ) -> None:
        record = active.record
        outcome: dict[str, Any] = {"reason": reason, "evidence": evidence}
        try:
            restore, delete = self._plan_revert(record.keys)
        except InvalidChange as exc:
            why = "; ".join(str(p) for p in exc.problems)
            outcome["reason"] = f"{reason}; not reverted, the daemon would reject it: {why}"
            outcome["rejected"] = [str(p) for p in exc.problems]
            self.finish(guard_id, active, BLOCKED, outcome)
            return
        except (TypeError, ValueError) as exc:  # an old value JSON cannot carry: as recorded
            self.log.warning("guard_revert_unchecked", guard=guard_id, error=str(exc))
            restore = {k: c.old for k, c in record.keys.items() if c.existed and not c.rejected}
            delete = [k for k in record.keys if k not in restore]
        # What was put back, as the record and the log show it: a secret's value is masked
        # (the record's ``keys`` keep the real one).
        hidden = self._hidden(record)
        outcome["restored"] = {
            k: masked_if(restore.get(k), k in hidden) for k in sorted(record.keys)
        }
        # A deleted key's "restored" value is null, as is a key restored to null.
        outcome["deleted"] = sorted(delete)
        puts = {etcd_key(self.app, k): to_text(v) for k, v in restore.items()}
        deletes = [etcd_key(self.app, k) for k in delete]
        puts[meta_key(self.app)] = json.dumps(
            {
                "time": time.time(),
                "by": f"hotknob-guard@{self.node}",
                "what": f"guard {guard_id} reverted",
            }
        )
        self.finish(guard_id, active, REVERTED, outcome, puts, deletes)

    def _hidden(self, record: GuardRecord) -> set[str]:
        """The keys of ``record`` whose values are never shown: marked secret in it, or
        hidden by the schema in force."""
        config = self._config() if self._config is not None else None
        return hidden_keys(
            record, secret_keys(config.schema) if config is not None else frozenset()
        )

    def _plan_revert(self, keys: Mapping[str, KeyChange]) -> tuple[dict[str, Any], list[str]]:
        """The old values to put back and the keys to delete (dotted: those the change
        created, and those whose old value the daemon had rejected), checked against the
        configuration in force (``revert_plan``); unchecked without one."""
        old = {k: c.old for k, c in keys.items() if c.existed}
        rejected = {k for k, c in keys.items() if c.rejected}
        config = self._config() if self._config is not None else None
        if config is None or "etcd" not in config.layers:
            restore = {k: v for k, v in old.items() if k not in rejected}
            return restore, [k for k in keys if k not in restore]
        layers = list(dict(config.layers).values())
        return revert_plan(
            config.schema, tuple(config.precedence), layers, list(keys), old, rejected
        )

    def finish(
        self,
        guard_id: str,
        active: ArmedGuard,
        state: str,
        outcome: dict[str, Any],
        puts: dict[str, str] | None = None,
        deletes: list[str] | None = None,
    ) -> None:
        """Write the ending (and for a revert, the restored values) in one transaction; not
        once the daemon is stopping."""
        if self._stopped():
            return
        active.busy = True
        record = active.record
        ended = dataclasses.replace(
            record,
            state=state,
            outcome={
                **outcome,
                "time": time.time(),
                "node": self.node,
                "revision": active.revision,
            },
        )
        writes = {**(puts or {}), guard_key(self.app, guard_id): ended.to_json()}
        expect = {guard_key(self.app, guard_id): active.revision}
        if state != SUPERSEDED:
            expect.update({etcd_key(self.app, k): active.revision for k in record.keys})
        future = self._commit(writes, deletes or [], expect)
        self._then(future, self._finished, guard_id, active, ended)

    def _finished(
        self, guard_id: str, active: ArmedGuard, ended: GuardRecord, result: int | BaseException
    ) -> None:
        record = active.record
        if isinstance(result, ConflictError):
            if guard_key(self.app, guard_id) in result.current:
                # Another daemon ended it: still watched, busy, until the guard watch
                # brings its record (``announce``), so that watchers here hear of it too.
                return
            outcome = {"reason": "the guarded keys were changed since", "changed": result.current}
            self.finish(guard_id, active, SUPERSEDED, outcome)
            return
        if isinstance(result, BaseException):
            active.busy = False  # the next report tries again
            self.log.warning(
                "guard_write_failed", guard=guard_id, state=ended.state, error=str(result)
            )
            return
        self._ended(guard_id)
        outcome = ended.outcome or {}
        if ended.state == REVERTED:
            event = self._event(ended, active.revision, result)
            self.log.warning(
                "change_reverted",
                guard=guard_id,
                key=",".join(sorted(record.keys)),
                restored=event["restored"],
                deleted=event["deleted"],
                replaced=event["replaced"],
                reason=outcome.get("reason"),
                evidence=outcome.get("evidence"),
                guarded_revision=active.revision,
                revision=result,
            )
        else:
            fields = {k: v for k, v in outcome.items() if k not in _OUTCOME_LOGGED_APART}
            log = self.log.warning if ended.state in (BLOCKED, ABANDONED) else self.log.info
            log(
                "guard_" + ended.state,
                guard=guard_id,
                key=",".join(sorted(record.keys)),
                guarded_revision=active.revision,
                revision=result,
                **fields,
            )
        self.announce(active, ended, result)

    def announce(self, active: ArmedGuard, ended: GuardRecord, revision: int) -> None:
        """Send ``watch`` clients the ending ``ended`` (written at ``revision``), once per
        daemon: by the one that wrote it, and by every other that watched the guard, as
        its guard watch brings the record (only the writer logs it)."""
        if active.announced:
            return
        active.announced = True
        self._broadcast(self._event(ended, active.revision, revision))

    def _event(self, ended: GuardRecord, guarded_revision: int, revision: int) -> dict[str, Any]:
        outcome = ended.outcome or {}
        common = {
            "type": "event",
            "event": "guard_" + ended.state,
            "guard": ended.id,
            "reason": outcome.get("reason"),
            "guarded_revision": guarded_revision,
            "revision": revision,
            "time": time.time(),
        }
        if ended.state != REVERTED:
            return common
        hidden = self._hidden(ended)
        recorded: Any = outcome.get("restored")
        put_back: dict[str, Any] = recorded or {
            k: c.old if c.existed else None for k, c in ended.keys.items()
        }
        deleted = outcome.get("deleted")
        if not isinstance(deleted, list):
            deleted = sorted(k for k, c in ended.keys.items() if not c.existed)
        return {
            **common,
            "event": "change_reverted",
            "restored": {k: masked_if(v, k in hidden) for k, v in put_back.items()},
            "deleted": deleted,
            "replaced": {k: masked_if(c.new, k in hidden) for k, c in ended.keys.items()},
            "evidence": outcome.get("evidence"),
        }
