"""A whole etcd layer merged at once (a start, a re-read after a compaction): the keys the
schema refuses are dropped, and each keeps the value the daemon ran for it, if it ran one.

A change refused on the way leaves the value in force as it was; a full read must not do
otherwise. Without ``kept``, a daemon restarted while etcd holds a value it refuses (written
with ``etcdctl``, around ``set``'s validation; or one only a node with a stricter schema
refuses) would trade the value it ran for a lower layer's: a default 200 times the learning
rate the process ran, at its next step.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from hotknob.config import InvalidChange, Layer, Snapshot
from hotknob.config.dropping_invalid import merge_dropping_invalid
from hotknob.config.errors import Problem


def merge_full_read(
    schema: type[BaseModel],
    others: list[Layer],
    candidate: Layer,
    precedence: Sequence[str],
    *,
    kept: Mapping[str, Any] | None,
    on_drop: Callable[[InvalidChange, list[Problem]], None],
    log: Any,
    revision: int,
    repeated: Collection[str] = (),
) -> tuple[Layer, Snapshot]:
    """The etcd layer to keep (``candidate`` less the keys that make the configuration
    invalid, those back at their ``kept`` values where they have one), and the merge of it
    with the ``others``. The keys are dropped one round at a time, each round told to
    ``on_drop`` (``merge_dropping_invalid``). A kept value that no longer fits (the schema
    changed) is dropped too. Raises ``InvalidChange`` only if the other layers are invalid
    without etcd.

    ``repeated``: the dropped keys whose refusal ``on_drop`` did not say again (refused
    before, not written since), filled as it hears of them: that each keeps its value is
    not said again either."""
    snapshot, problems = merge_dropping_invalid(
        schema, [*others, candidate], precedence, on_drop=on_drop
    )
    layer = candidate.without(p.key for p in problems)
    restore = {p.key: kept[p.key] for p in problems if kept and p.key in kept}
    if not restore:
        return layer, snapshot
    paths = {key: candidate.origins.get(key, "kept") for key in restore}
    with_kept = Layer("etcd", {**layer.values, **restore}, {**layer.origins, **paths})
    try:
        merged, unfit = merge_dropping_invalid(schema, [*others, with_kept], precedence)
    except InvalidChange:  # cannot be: ``layer`` alone merged; keep what it gave
        return layer, snapshot
    unfit_keys = {p.key for p in unfit}
    taken = sorted(set(restore) - unfit_keys - set(repeated))
    if taken:
        log.warning(
            "etcd_value_kept",
            revision=revision,
            keys=taken,
            detail="etcd holds a value this daemon refuses: it runs the one it ran before",
        )
    if unfit_keys:
        log.warning(
            "etcd_value_not_kept",
            revision=revision,
            keys=sorted(unfit_keys),
            detail="the value this daemon ran before no longer fits the schema",
        )
    return with_kept.without(unfit_keys), merged
