"""Where a value written to etcd has no effect, and the words that tell the operator so.

A write can be valid and still change nothing live: a higher layer (the config files,
env, ``--set``) shadows the key here, or holds it on some daemon (as its processes'
status says), or the key is restart-only. ``set``, ``unset`` and ``rollback``
(cmd_etcd.py) write all the same, and warn with these; a value refused only because of
what a higher layer sets is refused with a note naming that layer. Apart from the write,
which they only report on: each reason is a reading of the layers, the schema or the
daemons' status of its own.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from hotknob.config import Problem
from hotknob.config.merge import Snapshot
from hotknob.config.nesting import value_at
from hotknob.config.schema import restart_only_keys, restart_only_written
from hotknob.config.secrecy import shown_value

from .context import Context
from .guard_display import some_names
from .status_entries import pinned_by
from .table import fmt


def warn_shadowed(snapshot: Snapshot, keys: list[str], secrets: frozenset[str]) -> None:
    for key in keys:
        effective = shown_value(key, value_at(snapshot.flat, key), secrets)
        print(
            f"hotknob: warning: {key} is shadowed by the {snapshot.shadowing('etcd', key)} layer "
            f"(effective value {fmt(effective)}): the etcd value has no effect "
            "while that is set",
            file=sys.stderr,
        )


def pinned_on_daemons(entries: Mapping[str, Mapping[str, Any]], keys: Iterable[str]) -> list[str]:
    """Warnings for the ``keys`` that a layer above etcd (env, ``--set``) holds on some
    daemon, as their processes' status ``entries`` say (``pinned``): an etcd edit of them
    has no effect there, and ``set``, run elsewhere, cannot see that layer itself."""
    held: dict[tuple[str, str], list[str]] = {}
    wanted = set(keys)
    for name, entry in entries.items():
        pinned = entry.get("pinned")
        if not isinstance(pinned, dict):
            continue
        for key in wanted:
            layer = pinned_by(pinned, key)
            if layer is not None:
                held.setdefault((key, layer), []).append(name)
    return [
        f"{key} is held by the {layer} layer on the daemon of {len(names)} process(es) "
        f"({some_names(names, 3)}): the etcd value has no effect there while that is set"
        for (key, layer), names in sorted(held.items())
    ]


def _restart_only_written(ctx: Context, keys: Iterable[str]) -> set[str]:
    """The restart-only keys that ``keys`` (dotted) write (``restart_only_written``)."""
    return restart_only_written(keys, restart_only_keys(ctx.schema))


def warn_restart_only(ctx: Context, diff: Mapping[str, Any]) -> None:
    """A restart-only key (``json_schema_extra={"live": False}``) changes nothing live: the
    daemon reports it as pending a restart. Said here, so ``set`` is not taken to have
    changed it in the running processes."""
    for key in sorted(_restart_only_written(ctx, diff)):
        print(
            f"hotknob: warning: {key} is restart-only: a running process keeps the value it "
            "started with (`status` shows those waiting for a restart); a process started "
            "after its daemon restarted gets the new one",
            file=sys.stderr,
        )


def restart_only_guard(ctx: Context, diff: Mapping[str, Any]) -> list[str]:
    """A warning for a guard on a change of restart-only keys alone: no running process
    applies it (each keeps the value it started with, and one started after the change is
    not judged), so the guard can never judge it and ends abandoned."""
    if not diff or any(not _restart_only_written(ctx, [key]) for key in diff):
        return []
    keys = sorted(diff.keys())
    return [
        f"the guard can never judge this change: {', '.join(keys)} "
        f"{'is' if len(keys) == 1 else 'are'} restart-only, so no running process applies "
        "it (and one started after it is not judged): the guard ends abandoned, the change "
        "stays"
    ]


_SHADOWING = {
    "files": ("the config files, which lie above etcd in --precedence", "the files no longer set"),
    "env": ("an environment variable", "that variable no longer sets"),
    "cli": ("--set", "--set no longer gives"),
}


def shadowed_note(snapshot: Snapshot, problem: Problem) -> Problem:
    """``problem`` of an etcd value that a higher layer shadows, saying so: the merged
    configuration holds, and the refusal gave no reason why (the daemon, ``get`` and
    ``explain`` name the files that shadow such a value)."""
    winner = snapshot.shadowing("etcd", problem.key) if problem.key else None
    if winner is None:
        return problem
    by, until = _SHADOWING.get(winner, (f"the {winner} layer", "that layer no longer sets"))
    note = f" (shadowed by {by}: it would take effect once {until} that key)"
    return dataclasses.replace(problem, reason=problem.reason + note)


def warn_invalid_shadowed(problem: Problem) -> None:
    print(
        f"hotknob: warning: the etcd value of {problem.key} is invalid ({problem.reason}); "
        "it has no effect only while a higher layer sets that key",
        file=sys.stderr,
    )
