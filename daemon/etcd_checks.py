"""Checks of a new etcd layer before it is written: by ``set``/``unset``/``rollback`` and by
a guard's revert (``revert_plan``). What the daemon would do with it is what counts: merged
with the other layers it must be valid, and so must it be without the layers that may
shadow it now.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from pydantic import BaseModel

from hotknob.config import InvalidChange, Layer, Problem, merge_layers
from hotknob.config.dropping_invalid import merge_dropping_invalid
from hotknob.config.merge import Snapshot

_BELOW_SHADOWING = ("defaults", "files")


def validate_etcd_state(
    schema: type[BaseModel],
    precedence: Sequence[str],
    layers: Sequence[Layer],
    new_etcd: Mapping[str, Any],
) -> tuple[Snapshot, list[str]]:
    """Merge with ``new_etcd`` as the etcd layer; the snapshot and the etcd keys a higher
    layer shadows. Raises ``InvalidChange``."""
    others = [layer for layer in layers if layer.name != "etcd"]
    candidate = Layer("etcd", new_etcd, dict.fromkeys(new_etcd, "set"))
    snapshot = merge_layers(schema, [*others, candidate], precedence)
    shadowed = [k for k in new_etcd if snapshot.shadowing("etcd", k) is not None]
    return snapshot, shadowed


def files_below_etcd(precedence: Sequence[str]) -> tuple[str, ...] | None:
    """``precedence`` with the files layer moved just below etcd, if it is above it (the
    order ``defaults,etcd,files,env,cli``); None if it is not."""
    order = list(precedence)
    if order.index("files") < order.index("etcd"):
        return None
    order.remove("files")
    order.insert(order.index("etcd"), "files")
    return tuple(order)


_UNDER_FILES_NOTE = (
    " (shadowed by the config files, which lie above etcd in --precedence: it would take"
    " effect once the files no longer set that key)"
)


def shadowed_by_files(
    schema: type[BaseModel], precedence: Sequence[str], layers: Sequence[Layer]
) -> list[Problem]:
    """The etcd keys of ``layers`` that are invalid under the files layer that shadows them,
    where the order puts the files above etcd: empty otherwise.

    The files are live: an edit that drops a key brings the etcd value under it into
    force, and the daemon would then refuse that valid edit of the files for a value nobody
    saw in force. So the daemon refuses such an etcd value as it comes, as ``set`` does
    (``rejected_on_top``). Checked with the files just below etcd; the layers above etcd
    that are set for good (env, ``--set``) keep shadowing it, as in the default order.
    """
    order = files_below_etcd(precedence)
    files = next((layer.values for layer in layers if layer.name == "files"), None)
    if order is None or not files:
        return []
    try:
        _, dropped = merge_dropping_invalid(schema, layers, order)
    except InvalidChange:  # the other layers in that order: no fault of etcd's
        return []
    # Only what the files shadow: a value refused in the order as given is refused there.
    return [
        replace(p, reason=p.reason + _UNDER_FILES_NOTE)
        for p in dropped
        if not p.key
        or any(k == p.key or k.startswith(p.key + ".") or p.key.startswith(k + ".") for k in files)
    ]


def rejected_on_top(
    schema: type[BaseModel],
    precedence: Sequence[str],
    layers: Sequence[Layer],
    etcd_values: Mapping[str, Any],
) -> list[Problem]:
    """The etcd keys that would be rejected if etcd were the highest layer: merged over the
    defaults and the files alone, without the env and cli layers that may shadow them now.

    A value an env var or ``--set`` shadows has no effect while they are set, but takes
    effect as soon as a daemon runs without them: it is checked all the same. Keys are
    dropped one round at a time, as the daemon does; problems of the files themselves
    (a file value that env or cli shadows) are not this check's to report.
    """
    below = [layer for layer in layers if layer.name in _BELOW_SHADOWING]
    order = (*(name for name in precedence if name in _BELOW_SHADOWING), "etcd")
    values = dict(etcd_values)
    found: list[Problem] = []
    while True:
        candidate = Layer("etcd", values, dict.fromkeys(values, "set"))
        try:
            merge_layers(schema, [*below, candidate], order)
        except InvalidChange as exc:
            bad = [p for p in exc.problems if p.layer == "etcd"]
            if bad:
                found.extend(bad)
                for problem in bad:
                    values.pop(problem.key, None)
                continue
        return found


def revert_plan(
    schema: type[BaseModel],
    precedence: Sequence[str],
    layers: Sequence[Layer],
    keys: Sequence[str],
    old: Mapping[str, Any],
    rejected: Collection[str] = (),
) -> tuple[dict[str, Any], list[str]]:
    """The etcd values to put back for ``keys`` and the keys to delete: exactly the state
    before the change. ``old`` holds the values they had (a key not in it did not exist);
    a key of ``rejected`` had a value the daemon rejected when the change was made (never
    in force: the layers below etcd were), and is deleted so that what was in force
    comes back.

    It is checked as ``set`` checks a write: the etcd layer of ``layers`` with it, merged
    with the other layers, also as the top layer. Raises ``InvalidChange`` naming the
    problems if the daemon would reject it (a rule across fields that a later edit of
    another key now relies on, or an old value that the schema no longer takes): nothing
    else is tried, so that a revert never writes a value nobody set.
    """
    restore = {k: v for k, v in old.items() if k not in rejected}
    delete = [k for k in keys if k not in restore]
    in_force = next(layer for layer in layers if layer.name == "etcd").values
    values = {k: v for k, v in in_force.items() if k not in keys}
    values.update(restore)
    validate_etcd_state(schema, precedence, layers, values)
    # Valid only because env or cli shadows it: not written either.
    on_top = rejected_on_top(schema, precedence, layers, values)
    problems = [p for p in on_top if p.key in restore]
    if problems:
        raise InvalidChange(problems)
    return restore, delete
