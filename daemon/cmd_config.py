"""``get``, ``explain`` and ``validate``: reading the configuration and where it came from."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotknob.config import InvalidChange, LayerError, Snapshot, merge_layers, restart_only_keys
from hotknob.config.errors import InvalidInput
from hotknob.config.files import read_config_file
from hotknob.config.secrecy import SECRET_MASK, mask_secrets, secret_keys
from hotknob.config.sources import LIVE_LAYERS, defaults_layer, files_layer

from .context import Context, current_snapshot
from .table import dumps, fmt, render

Add = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def register(add: Add) -> None:
    p = add("get", cmd_get, "print the effective value of KEY, or of every key")
    p.add_argument("key", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("explain", cmd_explain, "show per key each layer's value and which layer won")
    p.add_argument("key", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("validate", cmd_validate, "check config files against the schema (for git hooks, CI)")
    p.add_argument("files", nargs="+", metavar="FILE")


def _select(snapshot: Snapshot, key: str | None) -> list[str]:
    if key is None:
        return list(snapshot.flat)
    if key in snapshot.flat:
        return [key]
    inside = [k for k in snapshot.flat if k.startswith(key + ".")]
    if not inside:
        raise InvalidInput(f"{key}: not a key of the schema")
    return inside


_NONE: Any = object()


def _inside_a_leaf(flat: dict[str, Any], key: str) -> Any:
    """The value at ``key`` inside the value of the leaf it lies below (``weights.head`` of
    ``weights``; a masked leaf stays masked); ``_NONE`` if no leaf holds it."""
    leaf = next((k for k in flat if key.startswith(k + ".")), None)
    if leaf is None:
        return _NONE
    node = flat[leaf]
    if node == SECRET_MASK:
        return node
    if not isinstance(node, dict):  # ``train.lr.x``: no leaf holds it
        raise InvalidInput(f"{key}: not a key of the schema")
    for part in key[len(leaf) + 1 :].split("."):
        if not isinstance(node, dict) or part not in node:
            raise InvalidInput(f"{key}: {leaf} holds no such key")
        node = node[part]
    return node


def cmd_get(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    snapshot, _ = current_snapshot(ctx, args)
    flat = mask_secrets(dict(snapshot.flat), secret_keys(ctx.schema))
    if args.key is not None and args.key not in flat:
        inside = _inside_a_leaf(flat, args.key)  # ``weights.head``: a key of a mapping
        if inside is not _NONE:
            print(dumps(inside) if args.json else fmt(inside))
            return 0
    keys = _select(snapshot, args.key)
    if args.json:
        if args.key in flat:
            print(dumps(flat[args.key]))
        else:
            print(dumps({k: flat[k] for k in keys}))
    elif args.key in flat:
        print(fmt(flat[args.key]))
    else:
        print(render(["KEY", "VALUE"], [[k, fmt(flat[k])] for k in keys]))
    return 0


def explain_rows(snapshot: Snapshot, keys: list[str]) -> list[dict[str, Any]]:
    secrets = secret_keys(type(snapshot.model))
    restart_only = restart_only_keys(type(snapshot.model))
    # Each layer's keys inside a value (``weights.head``), by the key they are inside: found
    # once, not by a scan of every layer's keys for each key (10,000 keys took 12 s).
    wanted = set(keys)
    within: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in snapshot.layers}
    for name, said in snapshot.layers.items():
        for k, v in said.items():
            parts = k.split(".")
            for end in range(1, len(parts)):
                outer = ".".join(parts[:end])
                if outer in wanted:
                    within[name].setdefault(outer, {})[".".join(parts[end:])] = v
    rows = []
    for key in keys:
        winner = snapshot.sources[key]
        layers: dict[str, Any] = {}
        given: dict[str, list[str]] = {}  # each layer's keys at ``key`` or inside its value
        for name, said in snapshot.layers.items():
            inside = within[name].get(key, {})
            if key in said or inside:
                # A layer's keys inside the value (``weights.head``) are shown with it.
                whole = said.get(key)
                if not inside:
                    layers[name] = whole
                elif isinstance(whole, dict):
                    layers[name] = {**whole, **inside}
                else:
                    layers[name] = inside
                given[name] = ([key] if key in said else []) + [f"{key}.{k}" for k in inside]
        value = snapshot.flat[key]
        if key in secrets:
            layers = {name: SECRET_MASK if v is not None else v for name, v in layers.items()}
            value = SECRET_MASK if value is not None else value
        # Not "below the winner": of a mapping, the winner is the highest layer that gave
        # a key inside it, which leaves in force the keys a lower layer gave beside it.
        shadowed = [
            name
            for name in layers
            if name in LIVE_LAYERS
            and any(snapshot.shadowing_part(name, k) is not None for k in given[name])
        ]
        rows.append(
            {
                "key": key,
                "value": value,
                "from": winner,
                "layers": layers,
                "shadowed": shadowed,
                "restart_only": key in restart_only,
            }
        )
    return rows


def cmd_explain(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    snapshot, revision = current_snapshot(ctx, args)
    key = args.key
    if key is not None and key not in snapshot.flat:  # ``weights.head``: its leaf's row
        _inside_a_leaf(dict(snapshot.flat), key)  # a key no leaf holds is refused, as in get
        key = next((k for k in snapshot.flat if key.startswith(k + ".")), key)
    rows = explain_rows(snapshot, _select(snapshot, key))
    # A layer not read here (its option not given) is no "nothing there": a daemon's own
    # --config or etcd may hold values.
    unread = [
        (layer, option)
        for layer, option, read in (
            ("files", "--config", bool(ctx.config_files)),
            ("etcd", "--etcd-endpoints", ctx.etcd is not None),
        )
        if not read
    ]
    if args.json:
        document = {
            "revision": revision if ctx.etcd is not None else None,  # no etcd, no revision
            "precedence": list(ctx.precedence),
            "not_read": [layer for layer, _ in unread],
            "keys": rows,
        }
        print(dumps(document))
        return 0
    order = list(ctx.precedence)
    table = []
    for row in rows:
        cells = []
        for name in order:
            if name not in row["layers"]:
                cells.append("-")
            else:
                mark = "*" if name in row["shadowed"] else ""
                cells.append(fmt(row["layers"][name]) + mark)
        value = fmt(row["value"]) + ("^" if row["restart_only"] else "")
        table.append([row["key"], value, row["from"], *cells])
    print(render(["KEY", "VALUE", "FROM", *order], table))
    notes = []
    if any(row["shadowed"] for row in rows):
        notes.append("* a live value (files or etcd) shadowed by a higher layer: it has no effect")
    if any(row["restart_only"] for row in rows):
        notes.append(
            "^ restart-only: the processes keep the value the daemon started with; this one "
            "takes effect when the daemon restarts"
        )
    if unread:
        said = ", ".join(f"{layer} (no {option} given)" for layer, option in unread)
        notes.append(f"- not read here: {said}; what each process runs: `hotknob status`")
    if notes:
        print("\n" + "\n".join(notes))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Each file alone over the defaults: prints ``file: key: reason`` lines, exit 1 if any."""
    ctx = Context.from_args(args)
    failures = 0
    for name in args.files:
        path = Path(name)
        try:
            parsed = read_config_file(path)
            merge_layers(
                ctx.schema,
                [defaults_layer(ctx.schema), files_layer(ctx.schema, [(path, parsed)])],
                ctx.precedence,
            )
        except LayerError as exc:
            failures += 1
            print(str(exc))
        except InvalidChange as exc:
            failures += 1
            for problem in exc.problems:
                print(f"{path}: {problem.key}: {problem.reason}")
    if failures:
        return 1
    print(f"{len(args.files)} file(s) valid")
    return 0
