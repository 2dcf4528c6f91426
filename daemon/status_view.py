"""How ``status`` shows the daemons' status entries: a row per process, or a summary of
them all (``--summary``: on a hundred nodes the rows run to hundreds of lines, and what
an operator looks for is who is not like the others).

A status entry is whatever a client reported, published as it came, or anything written
around hotknob: each field is shown only in the shape hotknob writes, or as text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeGuard

from .guard_display import some_names
from .guard_lang import escaped
from .reports import metrics_summary
from .status_entries import agreed_rank, agreed_text, is_int, is_time, waiting_for_restart
from .table import age_text, cut, fmt

ERRORS_CHARS = 100
PROCESS_CHARS = 60
ERRORS_SHOWN = 10
TABLE_HEADERS = ["PROCESS", "VERSION", "REVISION", "STEP", "AGE", "PID", "ERRORS", "METRICS"]
Entry = Mapping[str, Any]


def table_rows(entries: Sequence[Entry], now: float) -> list[list[Any]]:
    """One row per process (``TABLE_HEADERS``); ``now``: the wall time, for ages."""
    rows = []
    for e in entries:
        when = e.get("time")
        rank = e.get("rank")
        rows.append(
            [
                name_cell(e["key"]) + (f" (rank {fmt(rank)})" if rank is not None else ""),
                fmt(e.get("version", "-")),
                revision_text(e, now),
                fmt(e.get("step", "-")),
                age_text(now - when) if is_time(when) else "-",
                fmt(e.get("pid", "-")),
                errors_cell(e),
                metrics_text(e, now),
            ]
        )
    return rows


def name_cell(name: str) -> str:
    """A row's PROCESS: ``<node>/<client>``, cut in the middle past ``PROCESS_CHARS`` (a
    client may name itself with 256 characters, and every row is aligned on the widest;
    its node and the end of its name, a rank say, still tell it apart). ``--json`` has it
    whole."""
    if len(name) <= PROCESS_CHARS:
        return name
    head = (PROCESS_CHARS - 3) // 2
    return name[:head] + "..." + name[-(PROCESS_CHARS - 3 - head) :]


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def revision_text(entry: Entry, now: float) -> str:
    """The etcd revision the process runs, and the one it holds unapplied, if its daemon
    found one (``pending``: it takes it at its next ``apply``): ``212 (215 pending 41s)``."""
    runs = entry.get("revision")
    text = fmt(runs) if runs is not None else "-"
    pending = entry.get("pending")
    if isinstance(pending, dict) and "revision" in pending:
        since = pending.get("since")
        held = f" {age_text(now - since)}" if is_time(since) else ""
        text += f" ({fmt(pending['revision'])} pending{held})"
    return text


def error_parts(entry: Entry) -> list[str]:
    """What its daemon refused (``rejected``: an etcd revision; ``config_files``: its
    files), the restart-only keys whose new value waits for a restart (``restart_pending``:
    held back by its daemon; ``held``: by the process), the rank whose values it runs in
    place of its daemon's (``agreed``), then a status entry's ``errors``
    (a list of ``{"error": ...}`` objects: what the process's callbacks raised): one text
    each. The refusals its daemon has cleared since (``rejected_before``) are no error:
    it runs what etcd says for those keys now (they are for ``set --wait``, and in
    ``--json``)."""
    errors = entry.get("errors") or []
    items = errors if isinstance(errors, list) else [errors]
    texts = [fmt(x["error"]) if isinstance(x, dict) and "error" in x else fmt(x) for x in items]
    daemon = []
    rejected = entry.get("rejected")
    if isinstance(rejected, dict) and "revision" in rejected:
        daemon.append(
            f"its daemon rejected revision {fmt(rejected['revision'])}: "
            f"{fmt(rejected.get('reason', ''))}"
        )
    files = entry.get("config_files")
    if isinstance(files, dict):
        if "rejected" in files:
            daemon.append(f"its daemon rejected its config files: {fmt(files['rejected'])}")
        if "unreadable" in files:
            daemon.append(f"its daemon cannot read a config file: {fmt(files['unreadable'])}")
    waiting = waiting_for_restart(entry)
    if waiting:
        keys = ", ".join(fmt(key) for key in sorted(waiting))
        daemon.append(f"runs {keys} as it started: the new value waits for a restart")
    rank = agreed_rank(entry)
    if rank is not None:
        daemon.append(agreed_text(rank))
    return [*daemon, *texts]


def errors_cell(entry: Entry) -> str:
    """A row's ERRORS: every error, if they fit in ``ERRORS_CHARS``; else the first, cut
    to fit (a long parse error would widen every row), and how many more. ``--summary``
    and ``--json`` have them whole."""
    parts = error_parts(entry)
    whole = "; ".join(parts)
    if len(whole) <= ERRORS_CHARS:
        return whole
    more = f" (+{len(parts) - 1} more: status --summary)" if len(parts) > 1 else ""
    return cut(parts[0], ERRORS_CHARS) + more


def metrics_text(entry: Entry, now: float) -> str:
    """The latest reported values, and the step and age of the report that brought them
    (``loss=0.41 (step 3176, 1.2s ago)``): STEP and AGE are the applied change's, and a
    process that stopped reporting shows here."""
    metrics = entry.get("metrics")
    if metrics is None:
        return ""
    if not isinstance(metrics, dict) or not isinstance(metrics.get("latest", {}), dict):
        return "?"
    text = metrics_summary(entry)
    step, when = metrics.get("step"), metrics.get("time")
    if _is_number(step) and is_time(when):
        text += f" (step {fmt(step)}, {age_text(now - when)} ago)"
    return text


def summary_lines(
    entries: Sequence[Entry], revision: int, now: float, same: Collection[int] = ()
) -> list[str]:
    """``status --summary``: how many processes on how many nodes; how many run each etcd
    revision (naming those behind the newest, and those that run none yet, and how many of
    them were sent a newer one they have not applied); each distinct error, with how many
    have it and who (the ``ERRORS_SHOWN`` most common; the others counted); and what they
    report, with the oldest latest report and whose it is (a process that stopped
    reporting: hung, or done). ``same``: revisions below the newest run whose
    configuration in etcd is the newest's (``cmd_live.same_configuration``): their
    processes are not behind, and are not named as if they were."""
    nodes = {str(e.get("node") or e["key"].partition("/")[0]) for e in entries}
    lines = [
        f"{_processes(len(entries))} on {len(nodes)} node{'s' if len(nodes) != 1 else ''}, "
        f"etcd at revision {revision}"
    ]
    by_revision: dict[Any, list[Entry]] = {}
    for e in entries:
        runs = e.get("revision")
        by_revision.setdefault(runs if is_int(runs) else None, []).append(e)
    numbered = sorted((r for r in by_revision if r is not None), reverse=True)
    for runs in [*numbered, *([None] if None in by_revision else [])]:
        group = by_revision[runs]
        line = f"{'no revision' if runs is None else f'revision {runs}'}: {_processes(len(group))}"
        if runs is not None and runs != numbered[0] and runs in same:
            line += f" (the configuration of revision {numbered[0]}: none changed since)"
        elif runs is None or runs != numbered[0]:  # none yet: behind, whatever others run
            line += f": {some_names([e['key'] for e in group])}"
            line += _holding(group, now)
        lines.append(line)
    errors: dict[str, list[str]] = {}
    for e in entries:
        for text in error_parts(e):
            errors.setdefault(text, []).append(e["key"])
    # The most common first, and only the first ``ERRORS_SHOWN``: an error quoting a rank
    # or a step is distinct in every process, and would make this as long as the table.
    ranked = sorted(errors.items(), key=lambda item: -len(item[1]))
    for text, names in ranked[:ERRORS_SHOWN]:
        # Escaped, as the table's cells are: a traceback's newlines would break the lines.
        lines.append(f"error of {_processes(len(names))} ({some_names(names)}): {escaped(text)}")
    if len(ranked) > ERRORS_SHOWN:
        rest = {name for _, names in ranked[ERRORS_SHOWN:] for name in names}
        lines.append(
            f"and {len(ranked) - ERRORS_SHOWN} more distinct errors, of "
            f"{_processes(len(rest))}: status --json has them all"
        )
    lines.append(_reports_line(entries, now))
    return lines


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def _holding(group: Sequence[Entry], now: float) -> str:
    """`` (2 were sent revision 215, not applied yet: the longest for 41s)``, or nothing."""
    held = [e["pending"] for e in group if isinstance(e.get("pending"), Mapping)]
    revisions = [p["revision"] for p in held if is_int(p.get("revision"))]
    if not revisions:
        return ""
    since = [p["since"] for p in held if is_time(p.get("since"))]
    longest = f": the longest for {age_text(now - min(since))}" if since else ""
    were = "was" if len(revisions) == 1 else "were"
    return f" ({len(revisions)} {were} sent revision {max(revisions)}, not applied yet{longest})"


def _reports_line(entries: Sequence[Entry], now: float) -> str:
    """What the processes report: how many do, which metrics, and which one has been
    silent longest, since when."""
    names: Counter[str] = Counter()
    oldest: tuple[float, str] | None = None
    reporting = 0
    for e in entries:
        metrics = e.get("metrics")
        latest = metrics.get("latest") if isinstance(metrics, Mapping) else None
        if not isinstance(latest, Mapping) or not latest:
            continue
        reporting += 1
        names.update(str(name) for name in latest)
        when = metrics.get("time") if isinstance(metrics, Mapping) else None
        if is_time(when) and (oldest is None or when < oldest[0]):
            oldest = (when, e["key"])
    if not reporting:
        return "reports: none"
    shown = ", ".join(escaped(name) for name in sorted(names)[:8])
    shown += f" (+{len(names) - 8})" if len(names) > 8 else ""
    text = f"reports: {reporting} of {_processes(len(entries))} report {shown}"
    if oldest is not None:  # published at most every --status-every (5 s): older is silence
        text += f"; the oldest: {escaped(oldest[1])}'s, {age_text(now - oldest[0])} ago"
    return text
