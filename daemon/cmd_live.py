"""``run``, ``watch`` and ``status``: the daemon itself and what it shows of live processes."""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotknob.config import InvalidInput, Unavailable, UsageError
from hotknob.config.keys import UnaskedApp, config_prefix, status_prefix
from hotknob.config.secrecy import secret_keys
from hotknob.model_runtime import protocol

from .context import Context, static_layers
from .etcd_types import CompactedError, FutureRevisionError
from .guard_display import guards_table, shown_record
from .guard_lang import escaped
from .guard_records import read_guards
from .reports import REPORT_STATUS_EVERY_S
from .status_entries import is_int, status_entries
from .status_view import TABLE_HEADERS, summary_lines, table_rows
from .table import dumps, fmt, render

if TYPE_CHECKING:
    from .etcd_store import EtcdStore

Add = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def register(add: Add) -> None:
    p = add("run", cmd_run, "run the sidecar daemon: watch etcd and files, push changes")
    p.add_argument("--node", default=None, help="node name in status keys (default: hostname)")
    p.add_argument(
        "--etcd-start-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long to wait for etcd at start before serving the last-known-good "
        "(default %(default)g)",
    )
    p.add_argument(
        "--status-ttl",
        type=int,
        default=10,
        metavar="SECONDS",
        help="the lease of the status entries: those of a daemon that died vanish this long "
        "after (2 or more; default %(default)d)",
    )
    p.add_argument(
        "--status-every",
        type=float,
        default=REPORT_STATUS_EVERY_S,
        metavar="SECONDS",
        help="the most often a process's metric reports alone rewrite its status entry in "
        "etcd (an applied change, or a guard's progress, rewrites it at once; default "
        "%(default)g)",
    )

    p = add("watch", cmd_watch, "stream accepted and rejected changes as they happen")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--count",
        type=int,
        default=0,
        metavar="N",
        help="exit after N events (default 0: until Ctrl-C)",
    )

    p = add(
        "status",
        cmd_status,
        "show every process connected to the app's daemons and what it applied, and the "
        "guarded changes: read from etcd, where the daemons publish them (needs etcd)",
    )
    shown = p.add_mutually_exclusive_group()  # --json has every entry whole
    shown.add_argument("--json", action="store_true", help="machine-readable output")
    shown.add_argument(
        "--summary",
        action="store_true",
        help="instead of a row per process: how many run each revision (naming those "
        "behind), each error and who has it, what they report and whose report is oldest",
    )

    from .demo import cmd_demo, register_demo

    register_demo(add, cmd_demo)


def cmd_run(args: argparse.Namespace) -> int:
    from . import logs
    from .app import DaemonOptions, default_state_dir, run_daemon, socket_path_for

    logs.configure(level=args.log_level)
    if args.status_ttl < 2:  # its lease is kept alive every third of it: 0 would spin
        raise UsageError(f"--status-ttl must be 2 seconds or more, got {args.status_ttl}")
    if not 0 <= args.status_every <= 3600:
        raise UsageError(f"--status-every must be 0 to 3600 seconds, got {args.status_every}")
    if not args.etcd_start_timeout >= 0:
        raise UsageError(f"--etcd-start-timeout must be 0 or more, got {args.etcd_start_timeout}")
    ctx = Context.from_args(args)
    options = DaemonOptions(
        socket_path=socket_path_for(ctx.app, args.socket),
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        metrics_addr=args.metrics_addr,
        etcd_start_timeout=args.etcd_start_timeout,
        status_ttl=args.status_ttl,
        status_every=args.status_every,
    )
    if args.node is not None:
        if not _NODE_NAME.fullmatch(args.node):
            raise UsageError(
                f"--node {args.node[:60]!r}: a node name is 1 to 253 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit, as a host name is (it is the "
                "<node> of the status keys /hotknob/<app>/status/<node>/<client>)"
            )
        options.node = args.node
    return run_daemon(ctx, static_layers(ctx, args), options)


# One segment of the status keys: a ``/`` in it would make ``<node>/<client>`` ambiguous.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def _connect(path: Path, timeout: float = 3.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise Unavailable(
            f"no hotknob daemon at {path} ({exc.strerror or exc}): start one with `hotknob run`"
        ) from exc
    return sock


def _describe(event: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event.get("time", time.time())))
    kind = event.get("event", "?")
    if kind == "change_accepted":
        changes = " ".join(
            f"{k}={fmt(v)} (was {fmt(event.get('old', {}).get(k))})"
            for k, v in event.get("changed", {}).items()
        )
        more = (event.get("unlisted") or {}).get("keys")
        if more:  # a change too large for one line of the protocol (``event_cut``)
            changes += f" and {more} more keys"
        return (
            f"{when} accepted v{event.get('version')} rev {event.get('revision')} "
            f"[{event.get('layer')}] {changes}"
        )
    if kind == "change_rejected":
        reasons = "; ".join(f"{p.get('key')}: {p.get('reason')}" for p in event.get("problems", []))
        unlisted = (event.get("unlisted") or {}).get("problems")
        if unlisted:
            reasons += f"; and {unlisted} more"
        return f"{when} REJECTED rev {event.get('revision')} [{event.get('layer')}] {reasons}"
    if kind == "change_reverted":
        deleted = event.get("deleted") or []
        replaced = event.get("replaced") or {}
        changes = " ".join(
            f"{k}={'(deleted)' if k in deleted else fmt(v)} (was {fmt(replaced.get(k))})"
            for k, v in (event.get("restored") or {}).items()
        )
        return (
            f"{when} REVERTED rev {event.get('revision')} by guard {event.get('guard')} (the "
            f"change at rev {event.get('guarded_revision')}): {changes}: {event.get('reason')}"
        )
    if kind.startswith("guard_"):
        outcome = kind.removeprefix("guard_").upper()
        return (
            f"{when} GUARD {outcome} {event.get('guard')} (the change at rev "
            f"{event.get('guarded_revision')}): {event.get('reason')}"
        )
    if kind == "file_invalid":
        return (
            f"{when} REJECTED [files] {event.get('reason')} "
            f"(v{event.get('version')} stays in force)"
        )
    if kind == "restart_pending":
        return (
            f"{when} RESTART-ONLY rev {event.get('revision')} [{event.get('layer')}] "
            f"{event.get('key')}={fmt(event.get('wanted'))} waits for a restart of the daemon "
            f"and its processes (they run {fmt(event.get('running'))})"
        )
    if kind == "restart_pending_cleared":
        return (
            f"{when} RESTART-ONLY rev {event.get('revision')} [{event.get('layer')}] "
            f"{event.get('key')} is wanted at the value run again, "
            f"{fmt(event.get('running'))}: no restart is needed for it"
        )
    if kind == "etcd_path_ignored":
        where = f"rev {event.get('revision')} [etcd] {event.get('path')}"
        return f"{when} IGNORED {where}: {event.get('reason')}"
    return f"{when} {kind} {json.dumps(event)}"


def _line(event: dict[str, Any]) -> str:
    """``event`` as one line for a terminal: the keys, values and paths it quotes come
    from etcd or a config file, written by anyone, and a newline or an escape sequence
    there would break the line or reach the terminal (``escaped``, as a table's cells)."""
    return escaped(_describe(event))


RECONNECT_DELAYS_S = (0.1, 0.2, 0.5, 1.0, 2.0)  # then every 2 s, for as long as it runs


def cmd_watch(args: argparse.Namespace) -> int:
    from .app import socket_path_for

    if args.count < 0:
        raise UsageError("--count must be 0 (until Ctrl-C) or more")
    path = socket_path_for(args.app, args.socket)
    too_long = protocol.socket_path_problem(str(path))
    if too_long is not None:  # no daemon can listen there: "start one" would not help
        raise InvalidInput(too_long)
    sock = _connect(path)  # no daemon at the start is an error; later, one is waited for
    watch = _Watch(args, path)
    try:
        while watch.stream(sock):
            sock.close()
            watch.say_gone()
            sock = _reconnect(path)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


def _reconnect(path: Path) -> socket.socket:
    attempt = 0
    while True:
        time.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
        attempt += 1
        try:
            return _connect(path)
        except Unavailable:
            continue


class _Watch:
    """What ``watch`` printed so far, across the connections to a daemon that restarts."""

    def __init__(self, args: argparse.Namespace, path: Path) -> None:
        self.args = args
        self.path = path
        self.seen = 0
        self.reconnected = False

    def stream(self, sock: socket.socket) -> bool:
        """Print the events from ``sock``: False once ``--count`` of them are printed, True
        when the connection is lost."""
        sock.settimeout(None)
        try:
            sock.sendall(protocol.encode(protocol.hello("hotknob-watch", watch=True)))
            with sock.makefile("rb") as reader:
                for line in reader:
                    if not line.endswith(b"\n"):  # cut off as the daemon went away
                        return True
                    if not self.show(protocol.decode(line)):
                        return False
        except OSError:
            pass
        return True

    def show(self, message: dict[str, Any]) -> bool:
        """Print ``message`` if it is for people; False once ``--count`` events are."""
        kind = message.get("type")
        if kind == protocol.SNAPSHOT:
            self.check_app(message)
            self.say_watching(message)
        elif kind == protocol.ERROR:
            raise Unavailable(f"daemon refused: {message.get('error')}")
        elif kind == protocol.EVENT:
            print(json.dumps(message) if self.args.json else _line(message), flush=True)
            self.seen += 1
        return not self.args.count or self.seen < self.args.count

    def check_app(self, snapshot: dict[str, Any]) -> None:
        """The daemon's app (its snapshot names it) is the one asked for: ``HOTKNOB_SOCKET``
        left in a shell from another app would show that app's events as this one's. With
        a socket given and no app asked for (no ``--app``, no ``HOTKNOB_APP``), the
        daemon's app is shown instead."""
        served = snapshot.get("app")
        if not isinstance(served, str) or served == self.args.app:
            return
        if self.args.socket and isinstance(self.args.app, UnaskedApp):
            self.args.app = served
            return
        raise InvalidInput(
            f"the daemon at {self.path} serves app {served!r}, not {self.args.app!r}: "
            "check --socket (or HOTKNOB_SOCKET) and --app (or HOTKNOB_APP)"
        )

    def say_watching(self, snapshot: dict[str, Any]) -> None:
        at = f"version {snapshot['version']} rev {snapshot['revision']}"
        if self.args.json:
            if self.reconnected:
                line = {"type": "reconnected", "time": time.time()}
                line |= {"version": snapshot["version"], "revision": snapshot["revision"]}
                print(json.dumps(line), flush=True)
        elif self.reconnected:
            print(
                f"{_clock()} reconnected: watching {self.args.app}: {at} (events while the "
                f"daemon was away were not seen)",
                flush=True,
            )
        else:
            print(f"watching {self.args.app}: {at} (Ctrl-C to stop)", flush=True)

    def say_gone(self) -> None:
        self.reconnected = True
        if self.args.json:
            line = {"type": "disconnected", "time": time.time(), "socket": str(self.path)}
            print(json.dumps(line), flush=True)
            return
        print(
            f"{_clock()} lost the daemon at {self.path}: reconnecting (events until it is "
            f"back are not seen)",
            flush=True,
        )


def _clock() -> str:
    return time.strftime("%H:%M:%S", time.localtime())


def _status_entries(kvs: Mapping[str, bytes], app: str) -> list[dict[str, Any]]:
    """The app's status entries, each with its ``key`` (its name under the prefix); one
    that is no JSON object (written around hotknob) is skipped with a warning."""

    def warn(name: str) -> None:  # escaped as the table's cells: it may hold anything
        print(
            f"hotknob: warning: skipping status entry {escaped(name)}: not a JSON object",
            file=sys.stderr,
        )

    return [{**entry, "key": name} for name, entry in status_entries(app, kvs, warn).items()]


SAME_LOOKS = 8
"""The most older revisions ``same_configuration`` reads the config at (one read each)."""


def same_configuration(
    store: EtcdStore, app: str, entries: Sequence[Mapping[str, Any]]
) -> set[int]:
    """The revisions processes run, below the newest that any runs, at which the app's
    config in etcd is what it is at the newest. A daemon started again reads the config at
    etcd's revision of then, which status entries move on without a config change, and its
    processes say that one while the others still say the revision of the last change: not
    behind, though the numbers differ. A revision etcd compacted away is not compared (its
    processes stay named as behind: they may be)."""
    runs = sorted({e["revision"] for e in entries if is_int(e.get("revision"))}, reverse=True)
    same: set[int] = set()
    if len(runs) < 2:
        return same
    prefix = config_prefix(app)
    try:
        newest = store.read_prefix_state(prefix, runs[0]).values
        for older in runs[1 : SAME_LOOKS + 1]:
            if store.read_prefix_state(prefix, older).values == newest:
                same.add(older)
    except (CompactedError, FutureRevisionError):  # older ones are compacted too
        pass
    return same


def cmd_status(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    prefix = status_prefix(ctx.app)
    same: set[int] = set()
    with ctx.store() as store:
        kvs, revision = store.read_prefix(prefix)
        guards, guarded_at = read_guards(store, ctx.app)
        entries = _status_entries(kvs, ctx.app)
        if args.summary and entries:  # on the same connection: one per command
            same = same_configuration(store, ctx.app, entries)
    now = time.time()
    # A guarded change's values stay in its record (a revert writes them back); what is
    # shown of a secret key's is the mask.
    secrets = secret_keys(ctx.schema)
    if args.json:
        records = [shown_record(g, secrets) for g in guards]
        print(dumps({"revision": revision, "processes": entries, "guards": records}))
        return 0
    if guards:
        headers = ["GUARD", "STATE", "CHANGE", "EXPR", "OUTCOME"]
        rows = guards_table(guards, secrets=secrets, processes=entries, revisions=guarded_at)
        print(render(headers, rows) + "\n")
    if not entries:
        print(f"no process of app {ctx.app!r} has reported (revision {revision})")
        return 0
    if args.summary:
        print("\n".join(summary_lines(entries, revision, now, same)))
        return 0
    print(render(TABLE_HEADERS, table_rows(entries, now)))
    return 0
