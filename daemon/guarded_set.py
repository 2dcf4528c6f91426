"""What a guarded ``hotknob set`` needs to write its guard record: the command's options,
the guard they ask for, the baselines and the processes read from the status entries just
before the change, and the record itself (``record_for_set``).

This is the writing side, run once by the ``set`` command: the record's format and how it
is read back from etcd are ``guard_records``'s, how ``status`` shows it ``guard_display``'s,
and how a daemon watches and ends the guard ``guards``'s.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotknob.config import InvalidInput, UsageError
from hotknob.config.files import read_config_file
from hotknob.config.secrecy import hides

from .etcd_store import EtcdStore
from .guard_display import NAMES_SHOWN, some_names
from .guard_eval import Guard
from .guard_lang import escaped, parse_guard
from .guard_records import (
    DEFAULT_PATIENCE,
    KEEP_ENDED,
    GuardRecord,
    KeyChange,
    guard_key,
    new_guard_id,
)
from .reports import HISTORY, decode_value
from .status_entries import read_status_entries


@dataclass(frozen=True)
class GuardSpec:
    """What the operator asked for: the parsed guard, its window (steps) and patience."""

    guard: Guard
    window: int
    patience: int = DEFAULT_PATIENCE


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
        more = f", ... ({len(shown)} in all)" if len(shown) > NAMES_SHOWN else ""
        they = "they report " + ", ".join(escaped(n[:40]) for n in shown[:NAMES_SHOWN]) + more
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
