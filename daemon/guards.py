"""The guard manager: watches guarded changes and reverts one whose metrics get worse.

A guarded change is a record in etcd (see ``guard_records``) written in the same
transaction as the change, at revision R. Every daemon of the app watches the
records and, for its own processes:

* a process is *watched* from the step at which it acknowledged a state of
  revision ≥ R (the step the change landed in it), for ``window`` steps;
* each ``metrics`` report of a watched process is checked: a NaN or ±inf value
  of a metric the guard reads reverts at once; otherwise the guard is evaluated
  on the mean of the values reported since the previous report, against that
  process's baseline (else the mean of all processes' baselines), and
  ``patience`` failures in a row revert;
* when every watched process that reported has passed its window, the guard
  has *passed*.

A revert is ONE etcd transaction: the previous values of exactly the changed
keys (deleting the ones the change created), the record marked ``reverted``
with the evidence, and the who/when annotation. It compares the mod revision
of the record and of each changed key with R, so it lands only if nobody has
changed those keys since (else the guard is marked ``superseded``) and only
once across daemons. Then ``change_reverted`` is logged and sent to ``watch``
clients; the config watcher delivers the restored values like any other change.

Guards survive a restart: an armed record read at start is armed again (its
mod revision is R, since armed records are never rewritten); processes are
watched again from their first acknowledgement after the restart.

Everything here runs on the daemon's event loop except etcd calls, which run
on one worker thread and post their result back; the watch runs on its own
thread like the config watcher.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hotknob.config import HotknobError
from hotknob.config.keys import etcd_key, to_text

from .announce import EventSink
from .etcd_store import ConflictError, EtcdChange, EtcdOptions, EtcdStore
from .etcd_watcher import EtcdWatcher
from .guard_lang import Guard, GuardSyntaxError, MissingValue, parse_guard
from .guard_records import (
    ARMED,
    PASSED,
    REVERTED,
    SUPERSEDED,
    GuardRecord,
    guard_key,
    guards_prefix,
)
from .logs import get_logger
from .reports import Report, encode_value

Post = Callable[..., None]
_ACKS_KEPT = 64
_EVIDENCE_KEPT = 8


def _meta_key(app: str) -> str:
    from .cmd_etcd import meta_key

    return meta_key(app)


def _jsonable(values: Mapping[str, float]) -> dict[str, float | str]:
    return {k: encode_value(v) for k, v in values.items()}


@dataclass
class _Active:
    record: GuardRecord
    guard: Guard
    revision: int
    started: dict[str, int] = field(default_factory=dict)
    failures: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)
    passed: set[str] = field(default_factory=set)
    busy: bool = False


class GuardManager:
    """Guards of one app on one daemon. ``start``/``stop`` own a watch thread and a worker."""

    def __init__(
        self,
        *,
        app: str,
        node: str,
        options: EtcdOptions,
        post: Post,
        broadcast: EventSink,
    ) -> None:
        self.app = app
        self.node = node
        self._post = post
        self._broadcast = broadcast
        self._store = EtcdStore(options)
        self._watcher = EtcdWatcher(
            options,
            guards_prefix(app),
            on_snapshot=lambda kvs, rev: post(self._on_snapshot, kvs, rev),
            on_change=lambda change: post(self._on_change, change),
            name="hotknob-guard-watch",
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotknob-guards")
        self._active: dict[str, _Active] = {}
        self._resolving: set[str] = set()
        self._acks: dict[str, deque[tuple[int, int]]] = {}
        self.log = get_logger("hotknob.guards", app=app, node=node)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._watcher.start()

    def stop(self) -> None:
        """Blocking: stop the watch, finish or drop queued etcd calls, close the client."""
        self._watcher.stop()
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._store.close()

    @property
    def active(self) -> list[str]:
        return sorted(self._active)

    # --- what the processes say (from the socket server, on the loop) --------------------------

    def on_applied(self, client: str, revision: int | None, step: int) -> None:
        if revision is None:
            return
        self._acks.setdefault(client, deque(maxlen=_ACKS_KEPT)).append((revision, step))
        for active in self._active.values():
            if client not in active.started and revision >= active.revision:
                active.started[client] = step

    def on_disconnect(self, client: str) -> None:
        self._acks.pop(client, None)
        for guard_id, active in list(self._active.items()):
            active.started.pop(client, None)
            active.failures.pop(client, None)
            active.reported.discard(client)
            active.passed.discard(client)
            self._maybe_passed(guard_id, active)

    def on_report(self, client: str, report: Report) -> None:
        for guard_id, active in list(self._active.items()):
            start = active.started.get(client)
            if active.busy or start is None or report.step < start:
                continue
            self._check(guard_id, active, client, start, report)

    def _check(
        self, guard_id: str, active: _Active, client: str, start: int, report: Report
    ) -> None:
        guard = active.guard
        values = {m: v for m in guard.metrics if (v := report.value(m)) is not None}
        if not values:
            return  # this process does not report what the guard reads
        active.reported.add(client)
        bad = report.non_finite(guard.metrics)
        if bad:
            name, value = sorted(bad.items())[0]
            evidence = [{"client": client, "step": report.step, "values": _jsonable(values)}]
            reason = f"{client} reported {name}={encode_value(value)} at step {report.step}"
            self._revert(guard_id, active, reason, evidence)
            return
        baselines = self._baselines(active.record, client)
        try:
            holds = guard.holds(values, baselines)
        except MissingValue:
            holds = None
        failures = active.failures.setdefault(client, [])
        if holds is False:
            failures.append(
                {
                    "client": client,
                    "step": report.step,
                    "values": _jsonable(values),
                    "baselines": _jsonable({m: baselines[m] for m in guard.baselines}),
                }
            )
            del failures[:-_EVIDENCE_KEPT]
            if len(failures) >= active.record.patience:
                reason = (
                    f"{guard.text!r} failed on {len(failures)} reports in a row from {client} "
                    f"(steps {failures[0]['step']}..{report.step})"
                )
                self._revert(guard_id, active, reason, failures[-active.record.patience :])
                return
        elif holds is True:
            failures.clear()
        if report.step >= start + active.record.window:
            active.passed.add(client)
            self._maybe_passed(guard_id, active)

    def _baselines(self, record: GuardRecord, client: str) -> dict[str, float]:
        own = record.baselines.get(f"{self.node}/{client}")
        if own is not None:
            return own
        pooled: dict[str, list[float]] = {}
        for values in record.baselines.values():
            for name, value in values.items():
                pooled.setdefault(name, []).append(value)
        return {name: math.fsum(vs) / len(vs) for name, vs in pooled.items()}

    def _maybe_passed(self, guard_id: str, active: _Active) -> None:
        if active.busy or not active.reported or not active.reported <= active.passed:
            return
        outcome = {
            "reason": f"held for {active.record.window} steps",
            "clients": sorted(active.passed),
        }
        self._finish(guard_id, active, PASSED, outcome)

    # --- records (from the guard watch, on the loop) ------------------------------------------

    def _on_snapshot(self, kvs: Mapping[str, bytes], revision: int) -> None:
        seen = set()
        for path, raw in kvs.items():
            record = self._parse(path, raw)
            if record is None:
                continue
            seen.add(record.id)
            if record.state != ARMED:
                self._drop(record.id, record)
            elif record.id not in self._active and record.id not in self._resolving:
                self._resolving.add(record.id)
                future = self._worker.submit(self._mod_revision, guard_key(self.app, record.id))
                self._then(future, self._arm_resolved, record)
        for guard_id in list(self._active):
            if guard_id not in seen:
                self._drop(guard_id, None)

    def _on_change(self, change: EtcdChange) -> None:
        for path in change.deletes:
            self._drop(path.rsplit("/", 1)[-1], None)
        for path, raw in change.puts.items():
            record = self._parse(path, raw)
            if record is None:
                continue
            if record.state != ARMED:
                self._drop(record.id, record)
            elif record.id not in self._active:
                self._arm(record, change.revision)

    def _parse(self, path: str, raw: bytes) -> GuardRecord | None:
        try:
            record = GuardRecord.from_json(raw)
        except ValueError as exc:
            self.log.warning("guard_record_invalid", key=path, error=str(exc))
            return None
        if guard_key(self.app, record.id) != path:
            self.log.warning("guard_record_invalid", key=path, error="id does not match the key")
            return None
        return record

    def _arm_resolved(self, record: GuardRecord, result: int | BaseException) -> None:
        self._resolving.discard(record.id)
        if isinstance(result, BaseException):
            self.log.warning("guard_arm_failed", guard=record.id, error=str(result))
            return
        if result > 0 and record.id not in self._active:
            self._arm(record, result)

    def _arm(self, record: GuardRecord, revision: int) -> None:
        try:
            guard = parse_guard(record.guard)
        except GuardSyntaxError as exc:
            self.log.warning("guard_record_invalid", guard=record.id, error=str(exc))
            return
        active = _Active(record, guard, revision)
        for client, acks in self._acks.items():
            steps = [step for rev, step in acks if rev >= revision]
            if steps:
                active.started[client] = steps[0]
        self._active[record.id] = active
        self.log.info(
            "guard_armed",
            guard=record.id,
            expr=record.guard,
            key=",".join(sorted(record.keys)),
            window=record.window,
            patience=record.patience,
            revision=revision,
        )

    def _drop(self, guard_id: str, record: GuardRecord | None) -> None:
        active = self._active.pop(guard_id, None)
        if active is not None and record is not None:
            self.log.info("guard_ended", guard=guard_id, state=record.state)

    # --- ending a guard (etcd calls on the worker) ----------------------------------------------

    def _revert(
        self, guard_id: str, active: _Active, reason: str, evidence: list[dict[str, Any]]
    ) -> None:
        record = active.record
        outcome = {"reason": reason, "evidence": evidence}
        puts = {
            etcd_key(self.app, k): to_text(change.old)
            for k, change in record.keys.items()
            if change.existed
        }
        deletes = [etcd_key(self.app, k) for k, change in record.keys.items() if not change.existed]
        puts[_meta_key(self.app)] = json.dumps(
            {
                "time": time.time(),
                "by": f"hotknob-guard@{self.node}",
                "what": f"guard {guard_id} reverted",
            }
        )
        self._finish(guard_id, active, REVERTED, outcome, puts, deletes)

    def _finish(
        self,
        guard_id: str,
        active: _Active,
        state: str,
        outcome: dict[str, Any],
        puts: dict[str, str] | None = None,
        deletes: list[str] | None = None,
    ) -> None:
        """Write the ending (and for a revert, the restored values) in one transaction."""
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
        future = self._worker.submit(
            self._store.commit, writes, deletes or [], expect_mod_revisions=expect
        )
        self._then(future, self._finished, guard_id, active, ended)

    def _finished(
        self, guard_id: str, active: _Active, ended: GuardRecord, result: int | BaseException
    ) -> None:
        record = active.record
        if isinstance(result, ConflictError):
            if guard_key(self.app, guard_id) in result.current:
                self._active.pop(guard_id, None)  # another daemon ended it; the watch says how
                return
            self.log.info("guard_superseded", guard=guard_id, changed=sorted(result.current))
            outcome = {"reason": "the guarded keys were changed since", "changed": result.current}
            self._finish(guard_id, active, SUPERSEDED, outcome)
            return
        if isinstance(result, BaseException):
            active.busy = False  # the next report tries again
            self.log.warning(
                "guard_write_failed", guard=guard_id, state=ended.state, error=str(result)
            )
            return
        self._active.pop(guard_id, None)
        outcome = ended.outcome or {}
        if ended.state == REVERTED:
            restored = {k: c.old if c.existed else None for k, c in record.keys.items()}
            replaced = {k: c.new for k, c in record.keys.items()}
            self.log.warning(
                "change_reverted",
                guard=guard_id,
                key=",".join(sorted(record.keys)),
                restored=restored,
                replaced=replaced,
                reason=outcome.get("reason"),
                evidence=outcome.get("evidence"),
                guarded_revision=active.revision,
                revision=result,
            )
            self._broadcast(
                {
                    "type": "event",
                    "event": "change_reverted",
                    "guard": guard_id,
                    "restored": restored,
                    "replaced": replaced,
                    "reason": outcome.get("reason"),
                    "evidence": outcome.get("evidence"),
                    "guarded_revision": active.revision,
                    "revision": result,
                    "time": time.time(),
                }
            )
        else:
            self.log.info("guard_" + ended.state, guard=guard_id, revision=result, **outcome)
            self._broadcast(
                {
                    "type": "event",
                    "event": "guard_" + ended.state,
                    "guard": guard_id,
                    "reason": outcome.get("reason"),
                    "revision": result,
                    "time": time.time(),
                }
            )

    def _mod_revision(self, key: str) -> int:
        """The mod revision of ``key`` (0: absent), on the worker."""
        assert self._store is not None
        return self._store.mod_revision(key)

    def _then(self, future: Future[Any], fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args, result or exception)`` on the loop when ``future`` is done."""

        def done(f: Future[Any]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            result: Any = exc if exc is not None else f.result()
            if exc is not None and not isinstance(exc, HotknobError | OSError):
                self.log.error("guard_worker_failed", error=repr(exc))
            self._post(fn, *args, result)

        future.add_done_callback(done)
