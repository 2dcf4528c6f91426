"""``set``, ``unset`` and ``rollback``: validated writes to etcd, one transaction each.

Every write is checked first: the resulting configuration is merged with all
the layers this command can see and validated whole, so an invalid value
writes nothing. Keys a higher layer shadows are written but reported.
How a change is shown is write_diff.py's job; the warnings that a written value has
no effect somewhere are no_effect.py's.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from hotknob.config import InvalidChange, Problem, Unavailable, UsageError, etcd_layer
from hotknob.config.changes import changed_keys, same_value
from hotknob.config.dropping_invalid import merge_dropping_invalid
from hotknob.config.errors import HotknobError, InvalidInput
from hotknob.config.keys import etcd_key, key_path_fault, meta_key, to_text
from hotknob.config.schema import leaf_map
from hotknob.config.schema_facts import is_known
from hotknob.config.secrecy import secret_keys
from hotknob.config.sources import Layer, parse_assignment

from .context import Context, read_all_layers, warn_dropped
from .etcd_checks import rejected_on_top, validate_etcd_state
from .etcd_store import (
    CompactedError,
    ConflictError,
    EtcdStore,
    FutureRevisionError,
    NoSpaceError,
)
from .guard_records import KEEP_ENDED, prune_ended
from .guarded_set import GuardSpec, add_guard_options, describe, record_for_set, spec_from_args
from .no_effect import (
    pinned_on_daemons,
    restart_only_guard,
    shadowed_note,
    warn_invalid_shadowed,
    warn_restart_only,
    warn_shadowed,
)
from .settled import Guarded, Settled, finish, json_fields, settle
from .status_entries import read_status_entries
from .table import dumps
from .write_diff import print_diff, shown_diff

Add = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def register(add: Add) -> None:
    p = add("set", cmd_set, "validate, then write KEY=VALUE pairs to etcd in one transaction")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    p.add_argument("--dry-run", action="store_true", help="show the change, write nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_wait_option(p)
    add_guard_options(p)  # --guard, --window, --patience, --guard-file (guard_records.py)

    p = add("unset", cmd_unset, "delete keys from etcd in one transaction")
    p.add_argument(
        "keys", nargs="+", metavar="KEY", help="a key, or a section: every etcd value under it"
    )
    p.add_argument("--dry-run", action="store_true", help="show the change, write nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_wait_option(p)

    p = add("rollback", cmd_rollback, "restore the whole config to its state at a revision")
    p.add_argument(
        "--to-revision",
        type=int,
        required=True,
        metavar="REV",
        help="an etcd revision (`hotknob history` lists those that changed the config)",
    )
    p.add_argument("--dry-run", action="store_true", help="show the change, write nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_wait_option(p)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return seconds


def _add_wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        help="then wait until every process of the app runs the change (read from their "
        "status); exit 1 if a daemon rejects it, one has not applied it in time, or no "
        "process is connected to a daemon of the app",
    )


def _write(
    ctx: Context,
    args: argparse.Namespace,
    puts: Mapping[str, Any],
    deletes: list[str],
    header: str,
    guard: GuardSpec | None = None,
    *,
    sections: bool = False,
    computed_at: int | None = None,
) -> int:
    """Validate the etcd layer after ``puts``/``deletes`` (dotted keys) and commit them at once.

    With ``sections`` (``unset``), a key in ``deletes`` also stands for every etcd key under
    it, and one that is neither in the schema nor in etcd is refused (``_deleted_keys``);
    without it (``rollback``) exactly the keys given are deleted. With ``guard``, its
    record (see guard_records.py) is written in the same transaction.
    The commit holds only if no other write made with hotknob (each writes ``meta_key``)
    landed since the state that was checked was read, or since ``computed_at``, the
    revision the caller read to make ``puts`` and ``deletes`` (``rollback``: a write in
    between would stay, and the config would not be its state at the revision asked
    for); else nothing is written and the command fails, to be run again."""
    # Before anything is read: without etcd its layer reads as empty, and a dry run or an
    # ``unset`` would report what etcd holds as absent.
    ctx.require_etcd()
    layers, _, revision = read_all_layers(ctx, args)
    current = next(layer for layer in layers if layer.name == "etcd")
    unreadable = _unreadable(current)
    if sections:
        deletes = _deleted_keys(ctx, current.origins, deletes)
    touched = {*puts, *deletes}
    # Keys already in etcd that the daemon rejects are left as they are, and out of the check;
    # so are those that would be rejected but for a higher layer that shadows them.
    _, dropped = merge_dropping_invalid(ctx.schema, layers, ctx.precedence)
    ignored = {p.key for p in dropped} - touched
    warn_dropped([p for p in dropped if p.key in ignored])
    for problem in rejected_on_top(ctx.schema, ctx.precedence, layers, current.values):
        if problem.key not in touched and problem.key not in ignored:
            ignored.add(problem.key)
            warn_invalid_shadowed(problem)
    base = {k: v for k, v in current.values.items() if k not in ignored}
    new_etcd = dict(base)
    for key in deletes:
        new_etcd.pop(key, None)
    new_etcd.update(puts)
    snapshot, shadowed = validate_etcd_state(ctx.schema, ctx.precedence, layers, new_etcd)
    rejected = rejected_on_top(ctx.schema, ctx.precedence, layers, new_etcd)
    if rejected:  # valid only because a higher layer shadows it: not to be written either
        raise InvalidChange([shadowed_note(snapshot, p) for p in rejected])
    texts = {etcd_key(ctx.app, k): _text(k, v) for k, v in puts.items()}
    # A value that cannot be read is in no layer, so no diff of the layers shows it
    # going: deleted, it is a change all the same (else ``unset`` of it, or a rollback to
    # a revision without it, would say "nothing to do" and leave it in etcd).
    gone = [k for k in deletes if k in unreadable and k not in puts]
    diff = {
        k: (current.values.get(k), None if k in deletes and k not in puts else new_etcd.get(k))
        for k in [*changed_keys(base, new_etcd), *gone]
    }
    existed = current.values.keys()
    deleted = sorted(k for k in diff if k not in new_etcd)
    secrets = secret_keys(ctx.schema)
    # The old values the daemon rejects (never in force): a guard's revert deletes them.
    not_in_force: frozenset[str] = frozenset()
    if guard is not None:
        not_in_force = frozenset(p.key for p in dropped) | frozenset(
            p.key for p in rejected_on_top(ctx.schema, ctx.precedence, layers, current.values)
        )
    if args.dry_run:
        dry_warnings: list[str] = []
        if diff:
            # The checks and warnings of the real run (a key a daemon's env pins; for a
            # guard, a baseline that no process reports is refused), on the status
            # entries read now; nothing is written.
            with ctx.store() as store:
                entries = read_status_entries(store, ctx.app)
            dry_warnings += pinned_on_daemons(entries, diff)
            if guard is not None:
                _, _, would_warn = record_for_set(
                    entries,
                    ctx.app,
                    guard,
                    diff,
                    current.values,
                    secrets,
                    not_in_force & diff.keys(),
                )
                dry_warnings += would_warn + restart_only_guard(ctx, diff)
        title = f"dry run at revision {revision}: would write"
        print_diff(diff, args.json, title, secrets, existed, deleted, unreadable)
        warn_shadowed(snapshot, shadowed, secrets)
        warn_restart_only(ctx, diff)
        if guard is not None and not diff:
            dry_warnings.append("no guard would be armed: the change alters nothing in etcd")
        for warning in dry_warnings:
            print(f"hotknob: warning: {warning}", file=sys.stderr)
        return 0
    if not diff:
        warn_shadowed(snapshot, shadowed, secrets)
        if guard is not None:
            print(
                "hotknob: warning: no guard was armed: nothing changed, so there is "
                "nothing for it to judge",
                file=sys.stderr,
            )
        held = "no value of those keys" if sections else "those values already"
        text = f"nothing to do: etcd holds {held} (at revision {revision})"
        return _unchanged(ctx, args, revision, text)
    texts[meta_key(ctx.app)] = json.dumps(
        {"time": time.time(), "by": f"{getpass.getuser()}@{socket.gethostname()}", "what": header}
    )
    guard_warnings: list[str] = []
    with ctx.store() as store:
        record = None
        entries = read_status_entries(store, ctx.app)  # the daemons' processes, once
        if guard is not None:
            guard_path, record, guard_warnings = record_for_set(
                entries, ctx.app, guard, diff, current.values, secrets, not_in_force & diff.keys()
            )
            guard_warnings += restart_only_guard(ctx, diff)
            texts[guard_path] = record.to_json()
        pinned_warnings = pinned_on_daemons(entries, diff)
        checked_at = revision if computed_at is None else min(revision, computed_at)
        checked = {meta_key(ctx.app): store.mod_revision(meta_key(ctx.app), checked_at)}
        try:
            written = store.commit(
                texts, [etcd_key(ctx.app, k) for k in deletes], expect_mod_revisions=checked
            )
        except ConflictError as exc:
            (landed,) = exc.current.values()
            raise ConcurrentWrite(
                f"another write landed at revision {landed} after this one was checked "
                f"(at revision {checked_at}); nothing was written: run it again"
            ) from None
        except NoSpaceError:
            raise  # refused by etcd: nothing was written
        except Unavailable as exc:  # the answer lost: etcd may have taken the write
            look = f"hotknob history {next(iter(diff))}" if len(diff) == 1 else "hotknob history"
            raise Unavailable(
                f"{exc}; the change may have been written: `{look}` shows whether it was"
            ) from exc
        if not args.json:
            print_diff(
                diff,
                False,
                f"{header} at revision {written}",
                secrets,
                existed,
                deleted,
                unreadable,
            )
            if record is not None:
                print(describe(record))
        warn_shadowed(snapshot, shadowed, secrets)
        warn_restart_only(ctx, diff)
        if record is not None:
            guard_warnings += _prune_ended(store, ctx.app, args, record.id)
        for warning in [*pinned_warnings, *guard_warnings]:
            print(f"hotknob: warning: {warning}", file=sys.stderr)
        # --wait follows the status entries on this connection, after the commit.
        guarded = Guarded(record, guard_path) if record is not None else None
        settled = settle(store, ctx.app, written, diff, guarded, args.wait or 0.0, args.json)
        if args.json:
            result: dict[str, Any] = {
                "revision": written,
                "changed": {k: n for k, (_, n) in shown_diff(diff, secrets).items()},
                "deleted": deleted,  # their "changed" value is null, as is a key set to null
            }
            print(dumps({**result, **json_fields(settled, store, guarded)}))
        finish(settled, args.json)
    return 0


def _prune_ended(store: EtcdStore, app: str, args: argparse.Namespace, written: str) -> list[str]:
    """After a guarded write: the ended guards' records but the newest ``--keep-ended`` are
    deleted (``prune_ended``), never the one just ``written`` (a revert on a NaN may have
    ended it already, and ``--wait`` reads its verdict). The change is written whatever
    happens here: a failure is a warning, and the next guarded ``set`` tries again."""
    keep = getattr(args, "keep_ended", None)
    try:
        prune_ended(store, app, KEEP_ENDED if keep is None else keep, spare=(written,))
    except HotknobError as exc:
        return [f"the change is written, but old ended guards' records stay in etcd: {exc}"]
    return []


def _unchanged(ctx: Context, args: argparse.Namespace, revision: int, text: str) -> int:
    """Nothing to write: says so (``--json``: the shape of a write, with nothing changed,
    at ``revision``, the one checked), and with ``--wait`` waits as after a write, for
    every process to run the newest value etcd holds under the app's config."""
    result: dict[str, Any] = {"revision": revision, "changed": {}, "deleted": []}
    if not args.json:
        print(text)
    settled = Settled(revision, 0.0)
    if args.wait:
        with ctx.store() as store:
            _, mods, *_ = store.read_prefix_state(ctx.prefix, revision)
            newest = max(mods.values(), default=0)
            settled = settle(store, ctx.app, newest, (), None, args.wait, args.json)
            result.update(json_fields(settled, store, None))
    if args.json:
        print(dumps(result))
    finish(settled, args.json)
    return 0


def _deleted_keys(ctx: Context, in_etcd: Mapping[str, Any], keys: list[str]) -> list[str]:
    """The etcd keys that ``unset keys`` deletes: each key set in etcd, and every one set
    under a section. A key that is neither in the schema nor in etcd is a mistake (a
    typo would otherwise print "nothing to do"): ``InvalidInput``. A key of the schema is
    one the merge takes (``is_known``: a leaf, or a key under a leaf that holds a mapping,
    such as ``weights.head``), or a section; deleting one that etcd no longer holds is
    "nothing to do", so that ``unset`` can be run twice."""
    leaves = leaf_map(ctx.schema)
    found: dict[str, None] = {}
    for key in keys:
        below = [k for k in in_etcd if k == key or k.startswith(key + ".")]
        if (
            not below
            and not is_known(ctx.schema, key)
            and not any(k.startswith(key + ".") for k in leaves)
        ):
            raise InvalidInput(f"{key}: not a key of the schema, and etcd holds no value under it")
        found.update(dict.fromkeys(below))
    return list(found)


def _unreadable(layer: Layer) -> frozenset[str]:
    """The keys whose etcd value ``layer`` could not read (not UTF-8, a lone surrogate):
    a path that names a key (in ``origins``) with no value."""
    return frozenset(k for k in layer.origins if k not in layer.values)


class ConcurrentWrite(HotknobError):
    """Another hotknob write landed between reading and committing: nothing was written."""

    exit_code = 1


def _text(key: str, value: Any) -> str:
    """``to_text``, or ``InvalidChange`` for a value JSON cannot carry (validation catches
    those first; this keeps the promise of one clear line if a schema lets one through)."""
    try:
        return to_text(value)
    except (ValueError, TypeError) as exc:
        raise InvalidChange([Problem(key, "etcd", f"cannot be stored as JSON: {exc}")]) from None


def cmd_set(args: argparse.Namespace) -> int:
    guard = spec_from_args(args)  # a malformed guard is refused before anything is read
    ctx = Context.from_args(args)
    puts: dict[str, Any] = {}
    for pair in args.pairs:
        key, value = parse_assignment(pair)
        fault = key_path_fault(key)
        if fault is not None:  # written, it would be a path that every reader refuses
            raise InvalidChange([Problem(key, "etcd", f"has no etcd path: {fault}")])
        puts[key] = value
    return _write(ctx, args, puts, [], "wrote", guard)


def cmd_unset(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    return _write(ctx, args, {}, list(args.keys), "deleted", sections=True)


def cmd_rollback(args: argparse.Namespace) -> int:
    # etcd reads a revision of 0 or less as "now"; one past int64 it cannot be asked for
    if not 1 <= args.to_revision <= _MAX_REVISION:
        raise UsageError(f"--to-revision must be a revision (1 or more), got {args.to_revision}")
    ctx = Context.from_args(args)
    with ctx.store() as store:
        try:
            then, _ = store.read_prefix(ctx.prefix, revision=args.to_revision)
        except CompactedError:
            raise InvalidInput(
                f"cannot roll back to revision {args.to_revision}: etcd compacted it away, and "
                "keeps no state that old (`hotknob history` lists the revisions it keeps)"
            ) from None
        except FutureRevisionError:
            raise InvalidInput(
                f"cannot roll back to revision {args.to_revision}: etcd is only at revision "
                f"{store.current_revision()}"
            ) from None
    # A path that names no key (``train.lr``, ``train//lr``) cannot be restored as a key,
    # and is not one that the rollback could make invalid: it is skipped with a warning,
    # and whatever etcd holds at that path now is left as it is. A value that cannot be
    # read refuses the rollback.
    faults: list[Problem] = []
    old = etcd_layer(ctx.app, then, faults=faults)
    if old.problems:  # said to be the target's, not a fault of what etcd holds now
        where = f"in the rollback target, revision {args.to_revision}"
        raise InvalidChange(
            [Problem(p.key, p.layer, f"{p.reason} ({where})") for p in old.problems]
        )
    for fault in faults:
        print(
            f"hotknob: warning: ignoring etcd value of {fault.key} at revision "
            f"{args.to_revision}: {fault.reason}; rollback leaves that path as it is",
            file=sys.stderr,
        )
    layers, _, revision = read_all_layers(ctx, args)
    current = next(layer for layer in layers if layer.name == "etcd")
    # ``same_value``, not ``!=``: a rollback from ``0.0`` to ``-0.0``, or from ``{"a": true}``
    # to ``{"a": 1}``, restores a value that ``==`` takes for the one etcd holds now.
    puts = {
        k: v
        for k, v in old.values.items()
        if k not in current.values or not same_value(current.values[k], v)
    }
    # With the keys whose value cannot be read now (``_unreadable``): absent then, they go.
    deletes = [k for k in current.origins if k not in old.values]
    if not puts and not deletes:
        text = f"nothing to do: the config already equals its state at revision {args.to_revision}"
        if args.dry_run:
            print("{}" if args.json else text)
            return 0
        return _unchanged(ctx, args, revision, text)
    try:
        header = f"rolled back to revision {args.to_revision}"
        return _write(ctx, args, puts, deletes, header, computed_at=revision)
    except InvalidChange as exc:
        problems = [
            Problem(p.key, p.layer, f"rollback target invalid: {p.reason}") for p in exc.problems
        ]
        raise InvalidChange(problems) from None


_MAX_REVISION = 2**63 - 1  # etcd's revisions are int64
