"""Guard records as people see them: the ``status`` table of guards, a record as JSON with
its secret values masked, what an armed guard still waits for, and the short lists of
process names that all these texts (and the daemon's reasons) use.

Only reading and wording here, nothing written: the record and how it is stored are
``guard_records``'s; the values a record must never show (``hidden_keys``) are masked
wherever it is shown, by ``status`` and by the daemon's log and ``watch`` events alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from hotknob.config import InvalidInput
from hotknob.config.secrecy import SECRET_MASK, hides

from .guard_lang import escaped, parse_guard
from .guard_records import ARMED, GuardRecord
from .status_entries import is_int, is_time, never_applies, unchanged_by, waiting_for_restart
from .table import age_text

NAMES_SHOWN = 8


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
        shown = ", ".join(escaped(n[:40]) for n in sorted(reported)[:NAMES_SHOWN])
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


def some_names(names: Collection[str], limit: int = NAMES_SHOWN) -> str:
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
