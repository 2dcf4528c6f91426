"""``history``: past values of a key, a section or every key, from etcd's revisions.

etcd keeps no timestamps: the time and author of each change made with hotknob come
from the ``meta_key`` note that every such write (``set``, a guard's revert) puts in
the same transaction.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from hotknob.config import UsageError
from hotknob.config.errors import InvalidInput
from hotknob.config.keys import NotText, etcd_key, key_from_etcd, meta_key, parse_text
from hotknob.config.schema import leaf_map
from hotknob.config.schema_facts import is_known
from hotknob.config.secrecy import SECRET_MASK, hides, secret_keys
from hotknob.config.sendable import non_finite

from .cmd_etcd import Add
from .context import Context
from .etcd_store import EtcdStore
from .etcd_types import History
from .table import dumps, render


def register(add: Add) -> None:
    p = add("history", cmd_history, "past values of KEY (or of every key) from etcd's revisions")
    p.add_argument("key", nargs="?", metavar="KEY", help="a key, or a section: every key under it")
    p.add_argument(
        "--limit", type=int, default=20, metavar="N", help="the newest N changes (default 20)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _history(ctx: Context, store: EtcdStore, key: str | None, limit: int) -> History:
    """The history of every key (``key`` None), or of ``key`` and, for a section, of every
    key under it (``unset`` of a section deletes those): the key's own etcd path and the
    paths below it, read apart so that a sibling sharing its text (``samplingx`` of
    ``sampling``) is not taken in. No history for a key that is neither of the schema
    (``is_known``, or a section) nor ever in etcd is a typo: ``InvalidInput``."""
    if key is None:
        return store.history(ctx.prefix, prefix=True, limit=limit)
    target = etcd_key(ctx.app, key)
    own = store.history(target, prefix=False, limit=limit)
    below = store.history(target + "/", prefix=True, limit=limit)
    entries = sorted([*own.entries, *below.entries], key=lambda e: (-e.revision, e.key))
    a_section = any(k.startswith(key + ".") for k in leaf_map(ctx.schema))
    if not entries and not is_known(ctx.schema, key) and not a_section:
        raise InvalidInput(f"{key}: not a key of the schema, and etcd holds no history of it")
    return History(entries[:limit], own.reached_compaction or below.reached_compaction)


def cmd_history(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    if args.limit <= 0:
        raise UsageError("--limit must be positive")
    with ctx.store() as store:
        result = _history(ctx, store, args.key, args.limit)
        times = _write_times(store, ctx.app)
    secrets = secret_keys(ctx.schema)
    rows: list[dict[str, Any]] = []
    texts: list[str] = []
    for entry in result.entries:
        key = key_from_etcd(ctx.app, entry.key) or entry.key
        text = None if entry.value is None else entry.value.decode("utf-8", "replace")
        # The stored text whole: a section key's JSON object may hold a secret.
        masked = text is not None and hides(key, secrets)
        rows.append(
            {
                "key": key,
                "value": SECRET_MASK if masked else _typed(text),
                "deleted": text is None,
                "revision": entry.revision,
                "time": times.get(entry.revision, {}).get("time"),
                "by": times.get(entry.revision, {}).get("by"),
            }
        )
        texts.append("(deleted)" if text is None else SECRET_MASK if masked else text)
    note = "older history was compacted away" if result.reached_compaction else None
    if args.json:
        print(dumps({"entries": rows, "note": note}))
        return 0
    table = [
        [
            r["revision"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])) if r["time"] else "-",
            r["by"] or "-",
            r["key"],
            text,
        ]
        for r, text in zip(rows, texts, strict=True)
    ]
    headers = ["REVISION", "TIME", "BY", "KEY", "VALUE"]
    print(render(headers, table) if table else "(no history)")
    if any(r["time"] is None for r in rows):
        print("(TIME and BY are known for changes made with hotknob; etcd keeps no timestamps)")
    if note:
        print(f"note: {note}")
    return 0


def _typed(text: str | None) -> Any:
    """The value as the daemon reads ``text``: JSON text, or a bare word as a string (so is
    text that JSON allows and UTF-8 cannot carry, and a number too large for a float,
    ``1e999``: read, it is infinity, which ``--json`` could only print as ``Infinity``,
    no JSON at all)."""
    if text is None:
        return None
    try:
        value = parse_text(text)
    except NotText:
        return text
    return text if non_finite({"": value}) else value


def _write_times(store: EtcdStore, app: str) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for entry in store.history(meta_key(app), prefix=False, limit=10_000).entries:
        if entry.value is None:
            continue
        try:
            record = json.loads(entry.value)
        except ValueError:
            continue
        if isinstance(record, dict):  # written around hotknob, it may be anything
            found[entry.revision] = {
                "time": record.get("time") if _is_time(record.get("time")) else None,
                "by": record.get("by") if isinstance(record.get("by"), str) else None,
            }
    return found


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e11
