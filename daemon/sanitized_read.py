"""A whole etcd read made the engine's etcd layer (a start, a resync), and what is said of it.

A full read is not a change: it is what etcd holds, all of it, and the engine must run
on it even where some of it is invalid. Its paths that name no key are ignored, each
with a warning, as in a change; the keys that make it invalid are dropped, each keeping
the value this daemon ran for it (``full_read``); where the config files are above etcd,
so are the keys the files would shadow. Each round of keys dropped is announced as a
rejection, unless it only refuses again raw values refused and reported before and not
edited since (``ReportedValues``): watchers and the log would read it as a new bad write.

It is apart from the engine because none of it serves a live change: the engine takes
the layer and the snapshot this makes, as it takes any accepted change's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from hotknob.config import InvalidChange, Layer, Snapshot, etcd_layer
from hotknob.config.errors import Problem

from .announce import Announcer
from .etcd_checks import shadowed_by_files
from .full_read import merge_full_read
from .refused import ReportedValues


class SanitizedRead:
    """The full reads of the engine of ``schema`` and ``app``: ``announce`` and
    ``reported`` are the engine's own; ``on_still_refused`` hears of a round that is not
    announced again; ``files_above_etcd``: whether the files layer is above etcd."""

    def __init__(
        self,
        schema: type[BaseModel],
        app: str,
        precedence: Sequence[str],
        *,
        announce: Announcer,
        reported: ReportedValues,
        on_still_refused: Callable[[int, str, tuple[str, ...]], None],
        files_above_etcd: bool,
        log: Any,
    ) -> None:
        self._schema = schema
        self._app = app
        self._precedence = tuple(precedence)
        self._announce = announce
        self._reported = reported
        self._on_still_refused = on_still_refused
        self._files_above_etcd = files_above_etcd
        self._log = log

    def read(self, kvs: Mapping[str, bytes], revision: int) -> Layer:
        """The etcd layer of a full read; each path in it that names no key is ignored
        with a warning, as in a change (``on_etcd_change``)."""
        faults: list[Problem] = []
        layer = etcd_layer(self._app, kvs, faults=faults)
        if faults:
            self._announce.ignored(revision, faults)
        return layer

    def merge(
        self,
        layers: Mapping[str, Layer],
        candidate: Layer,
        revision: int,
        version: int,
        in_force: Mapping[str, Any],
        kept: Mapping[str, Any] | None = None,
        *,
        raw: Mapping[str, bytes | str] | None = None,
    ) -> tuple[Layer, Snapshot]:
        """Merge a whole etcd layer (a full read, or the saved values) with the other layers
        of ``layers``: the etcd layer to take and its snapshot. The keys that make it
        invalid are dropped, each round announced as a rejection (at ``version``, with
        ``in_force`` the values in force by dotted key), and each keeps its value in
        ``kept`` (what this daemon ran before the read: the values in force, or the state
        file's at a start), if it has one (``full_read.py``). Raises ``InvalidChange`` only
        if the other layers are invalid without etcd.

        ``raw``: the read's raw values, by etcd path (None: saved values, not read). A
        round that drops only keys whose raw value was refused and reported before, and
        not edited since (``_reported``), is not announced again: watchers and the log
        would read it as a new bad write. It stays refused (``on_still_refused``)."""
        now: dict[str, bytes | str] = {}
        repeated: set[str] = set()

        def announce(exc: InvalidChange, problems: list[Problem]) -> None:
            dropped = {p.key: candidate.values.get(p.key) for p in problems}
            if raw is None:
                self._announce.rejected("etcd", revision, version, exc, dropped, in_force)
                return
            values = {key: raw.get(candidate.origins.get(key, "")) for key in dropped}
            now.update((key, value) for key, value in values.items() if value is not None)
            if self._reported.repeated(values):
                repeated.update(dropped)
                self._on_still_refused(revision, str(exc), tuple(dropped))
            else:
                self._announce.rejected("etcd", revision, version, exc, dropped, in_force)

        others = [layer for name, layer in layers.items() if name != "etcd"]
        if self._files_above_etcd:
            under = shadowed_by_files(self._schema, self._precedence, [*others, candidate])
            if under:
                announce(InvalidChange(under), under)
                keys = [p.key for p in under]
                back = {key: kept[key] for key in keys if kept and key in kept}
                rest = candidate.without(keys)
                origins = {key: candidate.origins.get(key, "kept") for key in back}
                candidate = Layer(
                    "etcd", {**rest.values, **back}, {**rest.origins, **origins}, rest.problems
                )
        layer, snapshot = merge_full_read(
            self._schema,
            others,
            candidate,
            self._precedence,
            kept=kept,
            on_drop=announce,
            log=self._log,
            revision=revision,
            repeated=repeated,
        )
        if raw is not None:  # the keys it takes, or etcd no longer holds, are refused no more
            self._reported.replace(now)
        return layer, snapshot
