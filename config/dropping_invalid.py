"""Merging with the invalid keys of a live layer dropped, as the daemon does.

``merge_layers`` refuses a candidate with any problem in it, which is right for a
change someone is making. A live layer (etcd) can already hold a value nobody validated
(written with etcdctl), and the daemon never applies it; yet the daemon's full read and
the commands that show the configuration must still get a snapshot. This is that
policy: which of the live layer's keys are to blame, round by round, and when the
other layers are to blame instead. It only calls the merge, and holds none of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from pydantic import BaseModel

from .errors import InvalidChange, Problem
from .merge import DEFAULT_PRECEDENCE, Snapshot, merge_layers
from .sources import Layer


def merge_dropping_invalid(
    schema: type[BaseModel],
    layers: Iterable[Layer],
    precedence: Sequence[str] = DEFAULT_PRECEDENCE,
    *,
    layer: str = "etcd",
    on_drop: Callable[[InvalidChange, list[Problem]], None] | None = None,
) -> tuple[Snapshot, list[Problem]]:
    """Merge, dropping the keys of ``layer`` that make the result invalid, as the daemon does.

    A live layer can hold a value nobody validated (written with etcdctl); the
    daemon never applies it, so views of the configuration must not fail on it.
    Keys are dropped one round at a time: first those a problem names with ``layer``;
    failing those (a rule across fields, which pydantic reports on a section or on the
    whole model), the keys of ``layer`` at, under or above the problems' keys, else all
    of them. ``on_drop(error, problems)`` hears of each round. Returns the snapshot and
    the problems of the dropped keys. If the other layers are invalid without ``layer``,
    their ``InvalidChange`` is raised: then ``layer`` is not to blame.
    """
    current = list(layers)
    dropped: list[Problem] = []
    while True:
        try:
            return merge_layers(schema, current, precedence), dropped
        except InvalidChange as exc:
            bad = [p for p in exc.problems if p.layer == layer]
            if not bad:
                bad = _blamed_for_a_rule(schema, current, precedence, layer, exc)
            dropped.extend(bad)
            if on_drop is not None:
                on_drop(exc, bad)
            keys = {p.key for p in bad}
            current = [lay.without(keys) if lay.name == layer else lay for lay in current]


def _blamed_for_a_rule(
    schema: type[BaseModel],
    layers: list[Layer],
    precedence: Sequence[str],
    name: str,
    exc: InvalidChange,
) -> list[Problem]:
    """The keys of layer ``name`` to drop for problems that name none of its keys; re-raises
    the other layers' own ``InvalidChange`` if they are invalid without it."""
    live = next((lay for lay in layers if lay.name == name and lay.values), None)
    if live is None:
        raise exc
    merge_layers(schema, [lay for lay in layers if lay.name != name], precedence)
    reasons = {p.key: p.reason for p in exc.problems}
    near = {
        key: reason
        for key in live.values
        for at, reason in reasons.items()
        if at and (key == at or key.startswith(at + ".") or at.startswith(key + "."))
    }
    if not near:  # a rule over the whole model
        text = "; ".join(sorted(set(reasons.values())))
        near = dict.fromkeys(live.values, text)
    return [Problem(key, name, reason, live.values[key]) for key, reason in near.items()]
