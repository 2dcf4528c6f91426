"""Guarded changes as stored in etcd: the record, how ``set --guard`` builds it, how it is read.

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

import argparse
import getpass
import json
import math
import secrets
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hotknob.config import InvalidInput, UsageError
from hotknob.config.files import read_config_file
from hotknob.config.keys import ROOT, status_prefix
from hotknob.config.secrecy import SECRET_MASK, hides

from .etcd_store import EtcdStore
from .etcd_types import ConflictError
from .guard_lang import Guard, escaped, parse_guard
from .reports import HISTORY, decode_value
from .status import is_int, is_time, never_applies, unchanged_by, waiting_for_restart
from .table import age_text

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
class GuardSpec:
    """What the operator asked for: the parsed guard, its window (steps) and patience."""

    guard: Guard
    window: int
    patience: int = DEFAULT_PATIENCE


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


# --- building one, for ``set --guard`` ------------------------------------------------------


def add_guard_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "guarded change (revert it by itself if the reported metrics get worse)"
    )
    g.add_argument("--guard", metavar="EXPR", help="e.g. 'loss < 1.5 * baseline'")
    g.add_argument("--window", type=int, metavar="STEPS", help="steps to watch after the change")
    g.add_argument(
        "--patience",
        type=int,
        metavar="N",
        help=f"failed reports in a row (default {DEFAULT_PATIENCE})",
    )
    g.add_argument("--guard-file", metavar="FILE", help="guard, window, patience in YAML/TOML/JSON")
    g.add_argument(
        "--keep-ended",
        type=int,
        metavar="N",
        help=f"ended guards' records to leave in etcd, the newest (default {KEEP_ENDED})",
    )


def spec_from_args(args: argparse.Namespace) -> GuardSpec | None:
    """The guard asked for on the command line or in ``--guard-file``; None if none.

    Raises ``GuardSyntaxError``/``InvalidInput`` (exit 1) for a malformed guard or
    file and ``UsageError`` (exit 2) for options that do not fit together, before
    anything is read from or written to etcd.
    """
    text: Any = args.guard
    window: Any = args.window
    patience: Any = args.patience
    from_file: set[str] = set()  # the fields whose value the file gave
    if args.guard_file:
        if args.guard:
            raise UsageError("give either --guard or --guard-file, not both")
        data = read_config_file(Path(args.guard_file))
        unknown = sorted(set(data) - {"guard", "window", "patience"})
        if unknown:
            raise InvalidInput(f"{args.guard_file}: unknown field(s) {', '.join(unknown)}")
        text = data.get("guard")
        for name in ("window", "patience"):
            if getattr(args, name) is None and data.get(name) is not None:
                from_file.add(name)
        window = window if window is not None else data.get("window")
        patience = patience if patience is not None else data.get("patience")
        if not isinstance(text, str):
            raise InvalidInput(f"{args.guard_file}: needs a text field 'guard'")
    keep = getattr(args, "keep_ended", None)
    if text is None:
        if window is not None or patience is not None or keep is not None:
            raise UsageError("--window, --patience and --keep-ended need --guard or --guard-file")
        return None
    if keep is not None and keep < 0:
        raise UsageError(f"--keep-ended must be a whole number >= 0, got {keep}")
    guard = parse_guard(text)
    if window is None:
        where = f" (or 'window' in {args.guard_file})" if args.guard_file else ""
        raise UsageError(f"a guard needs --window STEPS{where} (how long to watch the change)")
    patience = DEFAULT_PATIENCE if patience is None else patience
    for name, value in (("window", window), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            if name in from_file:  # the file's content, not the command line: invalid input
                raise InvalidInput(
                    f"{args.guard_file}: {name} must be a whole number >= 1, got {value!r}"
                )
            raise UsageError(f"--{name} must be a whole number >= 1, got {value!r}")
    return GuardSpec(guard, window, patience)


def read_status_entries(store: EtcdStore, app: str) -> dict[str, dict[str, Any]]:
    """The status entries of ``app``'s processes by name (``<node>/<client>``); one that
    is not a JSON object (written around hotknob) is left out."""
    kvs, _ = store.read_prefix(status_prefix(app))
    return status_entries(app, kvs)


def status_entries(app: str, kvs: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """``read_status_entries`` of keys and values read (or watched) under the prefix."""
    prefix = status_prefix(app)
    entries: dict[str, dict[str, Any]] = {}
    for key, raw in sorted(kvs.items()):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries[key[len(prefix) :]] = entry
    return entries


def baselines_from(
    entries: Mapping[str, Mapping[str, Any]], app: str, metrics: frozenset[str]
) -> dict[str, dict[str, float]]:
    """Each reporting process's recent mean of each of ``metrics``, from its status entry.

    Raises ``InvalidInput`` if one of ``metrics`` has no finite mean from any process: a
    baseline needs reports from before the change. It says which processes report the
    metric with a mean that is not finite (a NaN or an infinity among their last
    ``HISTORY`` values), apart from a metric that no process reports.
    """
    baselines: dict[str, dict[str, float]] = {}
    not_finite: dict[str, list[str]] = {}  # by metric: the processes whose mean is not finite
    for name, entry in sorted(entries.items()):
        reported = entry.get("metrics")
        means = reported.get("mean") if isinstance(reported, dict) else None
        found = {}
        for metric in metrics:
            value = decode_value(means.get(metric)) if isinstance(means, dict) else None
            if value is not None and math.isfinite(value):
                found[metric] = value
            elif value is not None:
                not_finite.setdefault(metric, []).append(name)
        if found:
            baselines[name] = found
    missing = sorted(m for m in metrics if not any(m in b for b in baselines.values()))
    unreported = [m for m in missing if m not in not_finite]
    problems, hints = [], []
    if unreported:
        problems.append(f"no process of app {app!r} reports {', '.join(unreported)} yet")
        hints.append("call live.report in the run")
    for m in missing:
        if m in not_finite:
            problems.append(
                f"the mean of {m} over the last {HISTORY} reports of "
                f"{some_names(not_finite[m])} is not finite (a NaN or an infinity among them)"
            )
    if len(problems) > len(hints):
        hints.append("wait until the last reports hold none")
    if problems:
        raise InvalidInput(
            f"{'; '.join(problems)}: the guard's baseline is taken from reports before the "
            f"change ({', or '.join(hints)}), or write the guard without 'baseline'"
        )
    return baselines


def read_baselines(
    store: EtcdStore, app: str, metrics: frozenset[str]
) -> dict[str, dict[str, float]]:
    """``baselines_from`` the status entries read now (nothing is read for no metrics)."""
    if not metrics:
        return {}
    return baselines_from(read_status_entries(store, app), app, metrics)


_NAMES_SHOWN = 8


def _reported_names(entry: Mapping[str, Any]) -> set[str] | None:
    """The metric names a status entry shows reports of; None if it was written without
    some of its metrics (too many to tell)."""
    metrics = entry.get("metrics")
    left_out = entry.get("left_out")
    if isinstance(left_out, list) and "metrics" in left_out:
        return None
    if not isinstance(metrics, dict):
        return set()
    if metrics.get("omitted"):
        return None
    reported: set[str] = set()
    for part in ("latest", "mean"):
        names = metrics.get(part)
        if isinstance(names, dict):
            reported.update(str(name) for name in names)
    return reported


def unreported_warning(
    entries: Mapping[str, Mapping[str, Any]], app: str, guard: Guard
) -> str | None:
    """A warning for ``set`` if no process's status entry reports a metric the guard reads
    (a typo such as ``los``, or a run that does not report it): such a guard judges
    nothing and would stay armed. None if each is reported, or if an entry was written
    without some of its metrics (too many to tell)."""
    reported: set[str] = set()
    for entry in entries.values():
        names = _reported_names(entry)
        if names is None:
            return None
        reported |= names
    missing = sorted(guard.metrics - reported)
    if not missing:
        return None
    if reported:
        shown = sorted(reported)
        more = f", ... ({len(shown)} in all)" if len(shown) > _NAMES_SHOWN else ""
        they = "they report " + ", ".join(escaped(n[:40]) for n in shown[:_NAMES_SHOWN]) + more
    elif entries:
        they = "none has reported a metric yet"
    else:
        they = "no process has applied or reported anything yet"
    return (
        f"no process of app {app!r} reports {', '.join(missing)} ({they}): the guard "
        "judges nothing until one does (`hotknob status` shows what each process reports)"
    )


def reporting_processes(entries: Mapping[str, Mapping[str, Any]], guard: Guard) -> list[str]:
    """The processes (by status name) whose entry shows a report of a metric ``guard``
    reads, or was written without some of its metrics (too many to tell: counted in)."""
    return sorted(
        name
        for name, entry in entries.items()
        if (names := _reported_names(entry)) is None or guard.metrics & names
    )


def build_record(
    spec: GuardSpec,
    diff: Mapping[str, tuple[Any, Any]],
    previous: Mapping[str, Any],
    baselines: dict[str, dict[str, float]],
    secrets: frozenset[str] = frozenset(),
    *,
    rejected: frozenset[str] = frozenset(),
    processes: list[str] | None = None,
    reporting: list[str] | None = None,
) -> GuardRecord:
    """The record for a change of the dotted keys in ``diff`` (old, new), given the etcd
    values before it (``previous``, to tell a key that was absent from one set to null);
    the keys that ``secrets`` hides are marked secret, and those of ``rejected`` whose
    old value the daemon rejected (not in force) are marked so, as is one whose old value
    JSON cannot carry (``_storable``). ``processes``: the
    processes running when the change is written, ``reporting``: those of them that
    report what the guard reads (see the module's docstring)."""
    keys = {}
    for k, (old, new) in diff.items():
        # An old value JSON cannot carry (etcd's ``1e999``, an infinity) was not in force
        # (a schema refuses it), and no revert could write it back: stored as its text,
        # and marked rejected, so that a revert deletes it.
        old, non_finite = _storable(old)
        refused = k in rejected or non_finite
        keys[k] = KeyChange(old, k in previous, new, hides(k, secrets), refused and k in previous)
    return GuardRecord(
        id=new_guard_id(),
        guard=spec.guard.text,
        window=spec.window,
        patience=spec.patience,
        keys=keys,
        baselines=baselines,
        processes=processes,
        reporting=reporting,
        created=time.time(),
        by=f"{getpass.getuser()}@{socket.gethostname()}",
    )


def _storable(value: Any) -> tuple[Any, bool]:
    """``value`` as a record holds it, and whether it had to be changed for that: one with
    a non-finite number, which JSON cannot carry, becomes its text (``"Infinity"``)."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(value), True
    return value, False


def describe(record: GuardRecord) -> str:
    keys = ", ".join(sorted(record.keys))
    return (
        f"guard {record.id}: {record.guard} (window {record.window} steps, "
        f"patience {record.patience}) on {keys}"
    )


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


def record_for_set(
    entries: Mapping[str, Mapping[str, Any]],
    app: str,
    spec: GuardSpec,
    diff: Mapping[str, tuple[Any, Any]],
    previous: Mapping[str, Any],
    secrets: frozenset[str] = frozenset(),
    rejected: frozenset[str] = frozenset(),
) -> tuple[str, GuardRecord, list[str]]:
    """The etcd key and record that ``set --guard`` writes in its transaction, and the
    warnings to print (``unreported_warning``), given the status ``entries`` read just
    before (``read_status_entries``). ``rejected``: the changed keys whose value in etcd
    the daemon rejects (not in force).

    Raises ``InvalidInput`` when the guard needs a baseline that no process reports.
    """
    baselines = baselines_from(entries, app, spec.guard.baselines) if spec.guard.baselines else {}
    record = build_record(
        spec,
        diff,
        previous,
        baselines,
        secrets,
        rejected=rejected,
        processes=sorted(entries),
        reporting=reporting_processes(entries, spec.guard),
    )
    warning = unreported_warning(entries, app, spec.guard)
    return guard_key(app, record.id), record, [warning] if warning else []


def hidden_keys(record: GuardRecord, secrets: frozenset[str] = frozenset()) -> set[str]:
    """The keys of ``record`` whose values must not be shown: those marked secret in it,
    and those ``secrets`` (the schema at hand) hides."""
    return {k for k, c in record.keys.items() if c.secret or hides(k, secrets)}


def masked_if(value: Any, hidden: bool) -> Any:
    """``value``, or the mask if it is ``hidden`` (None stays None: an unset key is no secret)."""
    return SECRET_MASK if hidden and value is not None else value


def _text(value: Any, hidden: bool) -> str:
    return SECRET_MASK if hidden and value is not None else json.dumps(value)


def shown_record(record: GuardRecord, secrets: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``record`` as JSON for people (``status --json``): the old and new values of its hidden
    keys (``hidden_keys``) masked, in ``keys`` and in the ``restored`` of its outcome."""
    hidden = hidden_keys(record, secrets)
    data: dict[str, Any] = json.loads(record.to_json())
    for key, change in data["keys"].items():
        for name in ("old", "new"):
            change[name] = masked_if(change.get(name), key in hidden)
    restored = (data.get("outcome") or {}).get("restored")
    if isinstance(restored, dict):
        data["outcome"]["restored"] = {k: masked_if(v, k in hidden) for k, v in restored.items()}
    return data


def waiting_hint(
    record: GuardRecord,
    entries: Sequence[Mapping[str, Any]],
    now: float | None = None,
    revision: int | None = None,
) -> str:
    """For an armed guard that no process has reported to yet (as the status ``entries``
    show): what it waits for, e.g. a metric nobody reports. Once one has: the processes
    it waits to hear from (they applied the change and reported what it reads before it,
    nothing since), else those still inside their window, with the one furthest from its
    end (a process that stopped reporting inside its window holds the guard: hung, say),
    else empty. ``now``: the wall time, for the age of its last report. ``revision``: the
    change's (the armed record's mod revision), to tell why no process applied it."""
    watched = []
    heard = False
    silent: list[str] = []
    inside: list[Mapping[str, Any]] = []
    for entry in entries:
        windows = entry.get("guards")
        window = windows.get(record.id) if isinstance(windows, dict) else None
        if isinstance(window, dict):
            open_ = window.get("done") is not True
            if window.get("reported") is True:
                heard = True
                if open_:
                    inside.append(entry)
            elif open_ and entry.get("key") in (record.reporting or ()):
                silent.append(str(entry["key"]))
            watched.append(entry)
    if heard:
        if silent:
            return "waiting for the first report since the change from " + some_names(silent)
        if not inside:
            return ""
        names = [str(entry.get("key")) for entry in inside]
        text = "waiting for the end of the window of " + some_names(names)
        return text + _furthest(record, inside, time.time() if now is None else now)
    try:
        metrics = sorted(parse_guard(record.guard).metrics)
    except InvalidInput:
        return ""
    reported: set[str] = set()
    for entry in watched or entries:
        found = entry.get("metrics")
        latest = found.get("latest") if isinstance(found, dict) else None
        if isinstance(latest, dict):
            reported.update(str(name) for name in latest)
    missing = [m for m in metrics if m not in reported]
    if not watched:
        return _why_none_applied(record, entries, revision)
    if missing and reported:
        shown = ", ".join(escaped(n[:40]) for n in sorted(reported)[:_NAMES_SHOWN])
        return f"no report yet: no process reports {', '.join(missing)} (they report {shown})"
    return f"no report yet of {', '.join(metrics)} from the {len(watched)} process(es) watched"


def _why_none_applied(
    record: GuardRecord, entries: Sequence[Mapping[str, Any]], revision: int | None
) -> str:
    """For an armed guard that no process's entry shows a window of: why. None connected
    (those it watched left, say); or, for each process, its daemon refused the change or
    holds its keys above etcd, or the change altered no value in force there: nothing to
    judge, and the guard ends abandoned; else none has applied it yet."""
    if not entries:
        return (
            "no process is connected to a daemon of the app (one that left is not waited "
            "for): it ends abandoned unless one that ran the change comes back"
        )
    if revision is not None:
        keys = list(record.keys)
        refused: list[str] = []
        unchanged: list[str] = []
        held: list[str] = []
        for entry in entries:
            name = str(entry.get("key"))
            if never_applies(entry, revision, keys):
                refused.append(name)
            elif unchanged_by(entry, revision):
                (held if set(keys) <= waiting_for_restart(entry) else unchanged).append(name)
            else:
                break  # one that may still apply it
        else:
            parts = []
            if held:
                parts.append(
                    f"{some_names(held)} keep{'s' if len(held) == 1 else ''} "
                    f"{', '.join(sorted(keys))} as started (restart-only)"
                )
            if unchanged:
                parts.append(f"the change altered no value in force for {some_names(unchanged)}")
            if refused:
                parts.append(
                    f"the daemon of {some_names(refused)} refused it or holds its keys above etcd"
                )
            return "nothing to judge: " + "; ".join(parts) + " (it ends abandoned)"
    return "no report yet: no process has applied the change"


def _furthest(record: GuardRecord, inside: Sequence[Mapping[str, Any]], now: float) -> str:
    """``; the furthest from its end: n17/rank3, at step 120 of a window to 210, last report
    5m02s ago``, from the entries' windows and reports; empty if none says its step."""
    furthest: tuple[int, Mapping[str, Any], int, int] | None = None
    for entry in inside:
        window = entry["guards"][record.id]
        metrics = entry.get("metrics")
        step = metrics.get("step") if isinstance(metrics, Mapping) else None
        start = window.get("from")
        if not (is_int(step) and is_int(start)):
            continue
        end = start + record.window
        if furthest is None or end - step > furthest[0]:
            furthest = (end - step, entry, step, end)
    if furthest is None:
        return ""
    _, entry, step, end = furthest
    text = f"; the furthest from its end: {escaped(str(entry.get('key')))}, at step {step} of a "
    text += f"window to {end}"
    when = entry["metrics"].get("time")
    if is_time(when):
        text += f", last report {age_text(now - when)} ago"
    return text


def some_names(names: Collection[str], limit: int = _NAMES_SHOWN) -> str:
    """``a, b, c and 4 more``: the first ``limit`` of ``names``, sorted."""
    shown = ", ".join(escaped(n) for n in sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def guards_table(
    records: list[GuardRecord],
    limit: int = 10,
    secrets: frozenset[str] = frozenset(),
    processes: Sequence[Mapping[str, Any]] | None = None,
    revisions: Mapping[str, int] | None = None,
) -> list[list[Any]]:
    """Rows ``GUARD, STATE, KEYS, EXPR, OUTCOME`` for ``status``: armed ones, then the newest.
    Values of hidden keys (``hidden_keys``) are masked. Given the status entries
    (``processes``), an armed guard that nobody has reported to yet says what it waits for
    (``waiting_hint``; ``revisions``: each record's mod revision, by id)."""
    armed = [r for r in records if r.state == ARMED]
    ended = [r for r in records if r.state != ARMED][-limit:]
    rows = []
    for r in [*armed, *ended]:
        hidden = hidden_keys(r, secrets)
        keys = ", ".join(
            f"{k}={_text(c.new, k in hidden)} "
            f"(was {_text(c.old, k in hidden) if c.existed else 'unset'})"
            for k, c in sorted(r.keys.items())
        )
        reason = (r.outcome or {}).get("reason", "")
        if r.state == ARMED and processes is not None:
            reason = waiting_hint(r, processes, revision=(revisions or {}).get(r.id))
        rows.append([r.id, r.state, keys, f"{r.guard} (window {r.window})", reason])
    return rows
