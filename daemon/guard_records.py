"""Guarded changes as stored in etcd: the record, its key, and reading and pruning them.

A guarded ``set`` builds the record (``guarded_set``); ``status`` shows the records
(``guard_display``); each daemon watches them (``guards``).

A guarded ``hotknob set`` writes, in the same transaction as the change, one
record at ``/hotknob/<app>/guards/<id>`` (JSON)::

    {"id": "...", "guard": "loss < 1.5 * baseline", "window": 300, "patience": 3,
     "keys": {"train.lr": {"old": 0.0003, "existed": true, "new": 3.0}},
     "baselines": {"<node>/<client>": {"loss": 0.41}},
     "processes": ["<node>/<client>"],
     "state": "armed", "created": 1700000000.0, "by": "me@host"}

A key the schema keeps secret carries ``"secret": true``: the record holds its
real old value (a revert writes it back), and whatever shows the record (``status``,
the daemon's log and ``watch``) masks it, even where the schema is not at hand.
A key whose old value the daemon rejected when the change was made (written around
hotknob: it was never in force, the layers below etcd were) carries ``"rejected": true``:
a revert deletes it rather than write that value back. So does one whose old value JSON
cannot carry (etcd's ``1e999``, an infinity), which the record holds as its text.

``processes`` names the processes that had a status entry when the change was written:
they ran the configuration before it. A process of the list that (re)connects and
acknowledges the change is watched (after a daemon restart, or a reconnect); one that is
not in it and whose daemon never saw it acknowledge a state before the change is a
process that started after the change, and is never judged by the guard. A record
without the list (written by an older hotknob) counts the processes of its baselines.

``reporting`` names those of them whose entry showed a metric the guard reads: once
such a process applied the change, the guard does not pass before its first report
since (for ``REPORT_WAIT_S`` at most: see ``guards``), as its reports may come later
than the others'. A record without it (written by an older hotknob) waits for none.

Because the record and the changed keys are written by one transaction, they
share its revision R: while the record is ``armed`` it is never rewritten, so its
mod revision *is* R, and "nobody changed the keys since" means "their mod
revision is still R". Daemons end a guard by rewriting the record once, with
``state`` ``reverted``, ``passed``, ``superseded`` or ``blocked`` (it failed, but
no revert the daemon would accept exists) or ``abandoned`` (every process it watched
left before its window ended, or none ever applied the change: the change stays and
nothing judged it) and an ``outcome`` (an object); every such write compares the
record's mod revision to R, so exactly one ending wins. An ended record is
never written again; each guarded ``set`` deletes those but the newest ``KEEP_ENDED``
(``prune_ended``).

The baselines are read by ``set`` from what the daemons publish in the status
entries just before the change is written: each process's mean of its last 32
reported values of each metric the guard takes a baseline of. So they are
"the reports before the change", and they survive a daemon restart with the
record.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hotknob.config.keys import ROOT

from .etcd_store import EtcdStore
from .etcd_types import ConflictError

ARMED, REVERTED, PASSED, SUPERSEDED = "armed", "reverted", "passed", "superseded"
BLOCKED, ABANDONED = "blocked", "abandoned"
STATES = (ARMED, REVERTED, PASSED, SUPERSEDED, BLOCKED, ABANDONED)
DEFAULT_PATIENCE = 3
KEEP_ENDED = 100
"""How many ended guards' records a guarded ``set`` leaves in etcd, the newest
(``--keep-ended``): a tuner that guards a change every minute would otherwise add 1,440
records a day, which every ``status`` and every daemon's start reads whole."""
_PRUNE_BATCH = 64  # deletes per transaction: etcd takes at most 128 operations in one


def guards_prefix(app: str) -> str:
    return f"{ROOT}/{app}/guards/"


def guard_key(app: str, guard_id: str) -> str:
    return guards_prefix(app) + guard_id


def new_guard_id() -> str:
    """Sortable by creation time, unique without coordination: ``20240101T120000-3fa2c1``."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class KeyChange:
    old: Any
    existed: bool
    new: Any
    secret: bool = False  # its values are never shown (the schema's ``hides``)
    rejected: bool = False  # ``old`` was rejected by the daemon: never in force

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for flag in ("secret", "rejected"):
            if not data[flag]:  # records of other keys stay as they were
                data.pop(flag)
        return data


@dataclass
class GuardRecord:
    id: str
    guard: str
    window: int
    patience: int
    keys: dict[str, KeyChange]
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    processes: list[str] | None = None  # None: a record of an older hotknob
    reporting: list[str] | None = None  # None: a record of an older hotknob
    state: str = ARMED
    created: float = 0.0
    by: str = ""
    outcome: dict[str, Any] | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["keys"] = {k: v.to_dict() for k, v in self.keys.items()}
        for name in ("outcome", "processes", "reporting"):
            if data[name] is None:
                data.pop(name)
        return json.dumps(data, allow_nan=False, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> GuardRecord:
        """Parse a stored record; ``ValueError`` naming the problem if it is not one.

        Records may be written around hotknob: nothing else is raised, whatever the
        JSON holds (a window of ``1e999``, an ``outcome`` that is not an object)."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"malformed guard record: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError("a guard record must be a JSON object")
        outcome = data.get("outcome")
        if outcome is not None and not isinstance(outcome, dict):
            raise ValueError("malformed guard record: outcome must be an object")
        try:
            keys = {
                str(k): KeyChange(
                    v.get("old"),
                    bool(v.get("existed", True)),
                    v.get("new"),
                    v.get("secret") is True,
                    v.get("rejected") is True,
                )
                for k, v in dict(data["keys"]).items()
            }
            baselines = {
                str(proc): {str(m): float(x) for m, x in dict(values).items()}
                for proc, values in dict(data.get("baselines") or {}).items()
            }
            processes, reporting = (_names(data, name) for name in ("processes", "reporting"))
            record = cls(
                id=str(data["id"]),
                guard=str(data["guard"]),
                window=int(data["window"]),
                patience=int(data.get("patience", DEFAULT_PATIENCE)),
                keys=keys,
                baselines=baselines,
                processes=processes,
                reporting=reporting,
                state=str(data.get("state", ARMED)),
                created=float(data.get("created", 0.0)),
                by=str(data.get("by", "")),
                outcome=outcome,
            )
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as exc:
            raise ValueError(f"malformed guard record: {exc!r}") from None
        if record.state not in STATES or record.window < 1 or record.patience < 1 or not keys:
            raise ValueError("malformed guard record: bad state, window, patience or keys")
        try:  # what the daemon writes back and status prints: no NaN or infinity anywhere
            record.to_json()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed guard record: {exc}") from None
        return record

    def applied_before(self) -> frozenset[str]:
        """The processes (``<node>/<client>``) known to have run the configuration before
        the change: those listed in ``processes``, and those with a baseline."""
        return frozenset([*(self.processes or ()), *self.baselines])


def _names(data: Mapping[str, Any], field_name: str) -> list[str] | None:
    """A record's list of process names (None if absent); ``TypeError`` if not a list."""
    listed = data.get(field_name)
    if listed is None:
        return None
    if not isinstance(listed, list):
        raise TypeError(f"{field_name} must be a list of process names")
    return [str(name) for name in listed]


# --- reading them back, for ``status`` --------------------------------------------------------


def read_records(store: EtcdStore, app: str) -> list[GuardRecord]:
    """Every well-formed guard record of ``app``, oldest first."""
    return read_guards(store, app)[0]


def read_guards(store: EtcdStore, app: str) -> tuple[list[GuardRecord], dict[str, int]]:
    """``read_records``, and each record's mod revision by id: an armed one's is the
    revision of the change it guards (the two were written in one transaction)."""
    state = store.read_prefix_state(guards_prefix(app))
    records, revisions = [], {}
    for key, raw in sorted(state.values.items()):
        try:
            record = GuardRecord.from_json(raw)
        except ValueError:
            continue
        records.append(record)
        revisions[record.id] = state.mods[key]
    return records, revisions


def prune_ended(
    store: EtcdStore, app: str, keep: int = KEEP_ENDED, spare: Collection[str] = ()
) -> int:
    """Delete the records of ``app``'s ended guards but the newest ``keep``, and but the
    guards of ``spare`` (ids: the one the caller just wrote, which may have ended already,
    and whose verdict it may wait for); how many were deleted.

    An ended record is final (no daemon writes it again), so deleting it changes nothing
    a daemon does: one watching the prefix stops nothing, as it watches no ended guard.
    Each delete is conditional on the mod revision read, so a record written again since
    (by hand) stays; so do records that do not parse (written around hotknob) and armed
    ones. Ids sort by creation time (``new_guard_id``), and so do the keys."""
    state = store.read_prefix_state(guards_prefix(app))
    spared = {guard_key(app, guard_id) for guard_id in spare}
    ended = []
    for key, raw in sorted(state.values.items()):
        try:
            record = GuardRecord.from_json(raw)
        except ValueError:
            continue
        if record.state != ARMED and key not in spared:
            ended.append(key)
    old = ended[: max(0, len(ended) - keep)]
    deleted = 0
    for start in range(0, len(old), _PRUNE_BATCH):
        batch = old[start : start + _PRUNE_BATCH]
        try:
            store.commit({}, batch, expect_mod_revisions={k: state.mods[k] for k in batch})
        except ConflictError:
            continue  # one was written again since it was read: this batch stays, for now
        deleted += len(batch)
    return deleted
