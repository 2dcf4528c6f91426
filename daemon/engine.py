"""The engine: every change is merged, validated, versioned, published and persisted.

The engine owns the current layers and the last good ``Snapshot``. A live
change (an etcd revision, a new set of file contents) becomes a candidate:
the accepted layers with that one layer replaced. A valid candidate gets the
next version and is published, then logged (``change_accepted``); an invalid one
is logged with key, layer and reason and changes nothing. Restart-only keys keep
the value the daemon started with and are reported as pending a restart. The usual
etcd change, values put at leaves that no higher layer sets, takes a short path
(``_take_puts``): the same candidate, validated and pushed before the layer and the
snapshot are built; ``tests/test_engine_short_path.py`` holds it to the general one.
A caller that pushes a lone change on a thread of its own may have the rest of that
change's work (the layer and the snapshot built, the state saved, ``change_accepted``)
held as its *tail* (``hold_tail``), to run it once the clients had the change
(``finish``); every other call runs a held tail first, so none sees it missing.
Where the schema lets validating a value alone give what validating the whole model
gives (``config.leafwise``), only the values put are validated, dumped and diffed;
the commonest change of all, one plain value put alone, has those checks written for
the one value (``ShortPath.lone_put``, ``leafwise.validate_plain_put``), held to the
general path by the same tests. What the short path keeps from one change to the next
(the layers' merged leaves) and its checks are ``short_path``'s; the config files'
contents in force and their refusals are ``config_files``'s; a full read of etcd made
the etcd layer, its refused keys and what is said of them, ``sanitized_read``'s.

Versions strictly increase across restarts, crashes included, and no disk write
waits on the push path (see ``state``): a version is published only under the
version ceiling already on disk (raising it, with fsync, once per
``VERSION_BLOCK`` versions); the last-known-good snapshot is saved by a background
writer, coalesced; ``close`` saves the final state synchronously and marks it clean.
At start, a clean saved state with the same values keeps its version (clients apply
nothing); otherwise the version starts above everything the last daemon could have
published. What a start takes from the state file is ``saved_start``'s.

Calls are serialized by the caller (the daemon holds one lock around them: they come
from its event loop, or from the etcd watch thread for a change that comes alone);
``publish`` and ``broadcast`` are called on the calling thread. The engine does no
network I/O itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel

from hotknob.config import (
    InvalidChange,
    Layer,
    Snapshot,
    changed_keys,
    etcd_layer,
    merge_layers,
    restart_only_keys,
)
from hotknob.config.errors import Problem
from hotknob.config.keys import key_from_etcd
from hotknob.config.schema_facts import schema_facts
from hotknob.config.sendable import listed_bytes, room
from hotknob.config.sources import read_etcd_values

from .announce import Announcer, EventSink
from .config_files import ConfigFiles
from .etcd_checks import shadowed_by_files
from .logs import get_logger
from .published import Published
from .refused import ReportedValues
from .restart_only import RestartOnly
from .sanitized_read import SanitizedRead
from .saved_start import SavedStart
from .short_path import Pending, ShortPath
from .state import StateStore
from .state_format import SavedState
from .state_keeper import StateKeeper


def _noop(_: Any) -> None:
    return None


class Engine:
    def __init__(
        self,
        *,
        schema: type[BaseModel],
        app: str,
        precedence: Sequence[str],
        layers: Iterable[Layer],
        store: StateStore | None = None,
        publish: Callable[[Published], None] = _noop,
        broadcast: EventSink = _noop,
        on_accepted: Callable[[str, int], None] = lambda layer, version: None,
        on_rejected: Callable[[str, int, str, tuple[str, ...]], None] = lambda *rejection: None,
        on_still_refused: Callable[[int, str, tuple[str, ...]], None] = lambda *refusal: None,
        on_unchanged: Callable[[int], None] = lambda revision: None,
        on_restart_pending: Callable[[], None] = lambda: None,
    ):
        self.schema = schema
        self._on_unchanged = on_unchanged
        self.app = app
        self.precedence = tuple(precedence)
        self.layers: dict[str, Layer] = {layer.name: layer for layer in layers}
        self.store = store
        self._publish = publish
        restart_only = restart_only_keys(schema)
        self.snapshot: Snapshot | None = None
        self.current: Published | None = None
        self.version = 0
        self.revision = 0
        self.last_change_seconds = 0.0
        self._batching = False
        self._deferred: Callable[[], Published | None] | None = None  # a group's newest state
        self._pending: Pending | None = None  # only within a group: see ``_settle``
        self._after_push: list[Callable[[], None]] = []
        self._tail: list[Callable[[], None]] = []  # a lone change's work after its push
        self._hold_asked = False  # ``on_etcd_change(hold_tail=True)`` is running
        self._holding = False  # the short path is pushing a change whose tail is held
        self._flat: dict[str, Any] = {}
        # How many bytes of JSON the state may still grow by and still be sent (``room``):
        # measured when a merge is accepted, spent by the short path by each change's JSON.
        self._room = 0
        # What a snapshot names the restart-only and secret keys in: room taken from the line.
        self._listed = listed_bytes(restart_only, schema_facts(schema).secrets)
        self._closed = False
        self._reported = ReportedValues(app)  # refused, reported, not written since
        self.log = get_logger("hotknob.engine", app=app)
        self._keeper = StateKeeper(store, self.log) if store is not None else None
        self._files = ConfigFiles(schema, self.precedence, self._keeper)
        self._saved_start = SavedStart(self._keeper, self._files, self.log)
        secrets = schema_facts(schema).secrets  # cached by class: computed once
        self._restart = RestartOnly(restart_only, self.log, on_restart_pending, secrets, broadcast)
        self._short = ShortPath(schema, app, self.precedence, restart_only, self._restart)
        self._files_above_etcd = "files" in self._short.above_etcd
        self._announce = Announcer(
            self.log,
            secrets=secrets,
            broadcast=broadcast,
            on_accepted=on_accepted,
            on_rejected=on_rejected,
        )
        self._full_reads = SanitizedRead(
            schema,
            app,
            self.precedence,
            announce=self._announce,
            reported=self._reported,
            on_still_refused=on_still_refused,
            files_above_etcd=self._files_above_etcd,
            log=self.log,
        )

    @property
    def state_write_error(self) -> str | None:
        """Why the last write of the state file failed (None once one succeeds)."""
        return self._keeper.error if self._keeper is not None else None

    @property
    def pending_restart(self) -> Mapping[str, Any]:
        """Restart-only keys whose wanted value waits for a restart, with that value as it
        may be shown (``/healthz``): a secret's masked."""
        return self._restart.shown_pending()

    @property
    def restart_wanted(self) -> Mapping[str, Any]:
        """The same keys with their wanted values, a secret's too: only to compare with what
        a process runs (``feedback.ClientFeedback``), never to show."""
        return MappingProxyType(self._restart.pending)

    @property
    def holds_tail(self) -> bool:
        """Whether a lone change's work after its push is held (``finish`` runs it), from
        before that push until its last step has run: a client may answer the push before
        the engine has returned, or while another thread runs the tail, and the answer
        must wait for it (read without the lock, from the loop)."""
        return self._holding or bool(self._tail)

    def finish(self) -> None:
        """Run the held tail of a change, if any: its state handed to the writer, its etcd
        layer and snapshot built, its ``change_accepted`` line and event, in that order.
        Each step runs even if one before it raised; the first error is raised after."""
        # Each step leaves the tail once it has run: ``holds_tail`` stays true (for the
        # loop, which reads it without the lock) until the last one is done.
        tail = self._tail
        error: Exception | None = None
        while tail:
            try:
                tail[0]()
            except Exception as exc:
                error = error or exc
            finally:
                del tail[0]
        if error is not None:
            raise error

    def _then(self, step: Callable[[], None]) -> None:
        """Run ``step``, a change's work after its push: now, or in the held tail."""
        if self._holding:
            self._tail.append(step)
        else:
            step()

    # --- start ---------------------------------------------------------------------------------

    @property
    def files_refused(self) -> str | None:
        """Why the config files were refused at the start, which ran on their saved
        contents instead (``SavedStart.first_merge``); None if they were not."""
        return self._saved_start.files_refused

    def saved_files(self, paths: Sequence[Path]) -> dict[Path, Mapping[str, Any]]:
        """The contents of the config files ``paths`` as the saved state ran them, by path
        (``SavedStart.saved_files``). Reads the state file (once: ``start`` uses what it
        read)."""
        return self._saved_start.saved_files(paths)

    def start(
        self,
        etcd: Mapping[str, bytes] | None,
        revision: int,
        files: Sequence[tuple[Path, Mapping[str, Any]]] | None = None,
    ) -> Published:
        """Build the first snapshot; with ``etcd`` None, serve the last-known-good etcd values.

        ``files``: the config files' contents (the files layer is built from them), if
        the daemon has any; then, if they make the configuration invalid and the state
        file holds the contents those same files had as the daemon ran them, it starts on
        those, and ``files_refused`` says why (``SavedStart.first_merge``).

        Raises ``InvalidChange`` if the layers that are not live (defaults, env,
        cli) or the files are invalid (with no saved contents to start on instead): the
        daemon must not start on them.
        """
        saved = self._saved_start.saved()
        if files is not None:
            self.layers["files"] = self._files.run_on(files)
        if etcd is None:
            saved_etcd = saved.etcd if saved else {}
            self.layers["etcd"] = Layer("etcd", saved_etcd, dict.fromkeys(saved_etcd, "saved"))
            revision = saved.revision if saved else 0
            self.log.warning(
                "serving_last_known_good",
                version=saved.version if saved else 0,
                revision=revision,
                state_file=str(self.store.path) if self.store else None,
                found=saved is not None,
            )
        else:
            self.layers["etcd"] = etcd_layer(self.app, {})
        snapshot = self._first_merge(etcd, revision, saved, files)
        self._restart.start(snapshot.flat)
        self.version = self._saved_start.first_version(self._published(snapshot, revision).values)
        published = self._published(snapshot, revision)
        self.revision = revision  # what later changes of any layer are published at
        self.snapshot, self.current, self._flat = snapshot, published, dict(published.flat)
        self._room = room(snapshot.values, snapshot.flat, self._listed)
        if self._keeper is not None:
            # Before anything is served: the file no longer says "clean", and the ceiling
            # covers this version.
            self._keeper.reserve(published, self.layers["etcd"].values)
        self._publish(published)
        self.log.info("config_loaded", version=self.version, revision=revision)
        return published

    def _first_merge(
        self,
        etcd: Mapping[str, bytes] | None,
        revision: int,
        saved: SavedState | None,
        files: Sequence[tuple[Path, Mapping[str, Any]]] | None,
    ) -> Snapshot:
        """``start``'s merge: on the config files' saved contents if theirs are refused
        (``SavedStart.first_merge``)."""

        def merge() -> Snapshot:
            if "files" in self.layers:
                self._files.alone(self.layers["files"], self.layers)
            # The saved values too: written under an older schema, they may not fit it.
            if etcd is None:
                return self._merge_sanitized(self.layers["etcd"], revision)
            kept = saved.etcd if saved else None  # what it ran, for a key it now refuses
            candidate = self._full_reads.read(etcd, revision)
            return self._merge_sanitized(candidate, revision, kept, raw=etcd)

        return self._saved_start.first_merge(self.layers, files, merge)

    def close(self) -> None:
        """Stop taking changes; save the final state synchronously, marked clean.

        Called once the daemon publishes nothing more (its socket is closed): a restart
        on the same values may then keep this version.
        """
        if self._closed:
            return
        self.finish()
        self._closed = True
        if self._keeper is not None:  # closed before the start made a state: nothing to save
            final = self.current
            self._keeper.close(final, self.layers["etcd"].values if final is not None else {})

    # --- live changes --------------------------------------------------------------------------

    def on_etcd_snapshot(self, kvs: Mapping[str, bytes], revision: int) -> None:
        """A full read of the prefix (after a resync): diff against what is in force."""
        if self._closed:
            return
        self.finish()
        if revision < self.revision:  # etcd restored from a backup
            self._reported.forget()
        before = self.layers["etcd"].values
        candidate = self._full_reads.read(kvs, revision)
        snapshot = self._merge_sanitized(candidate, revision, kept=before, raw=kvs)
        edited = changed_keys(before, self.layers["etcd"].values)
        # Below the revision in force: etcd was restored from a backup, and its count
        # goes on from there. Published revisions follow etcd's, as clients compare them.
        self.revision = min(self.revision, revision)
        self._accept(snapshot, "etcd", revision, edited, before)

    def on_etcd_changes(
        self, changes: Iterable[tuple[int, Mapping[str, bytes], Iterable[str]]]
    ) -> None:
        """Etcd revisions that arrived together (a burst), oldest first: a group commit.

        Each revision is accepted or rejected on its own, exactly as ``on_etcd_change``
        does, and gets its own version and ``change_accepted`` line; only the newest
        accepted state is built, published and saved, once, at the end, so a burst costs
        one push instead of one per revision. Clients coalesce to the newest state anyway.
        """
        self.finish()
        self._batching = True
        try:
            for revision, puts, deletes in changes:
                self.on_etcd_change(revision, puts, deletes)
        finally:
            self._batching = False
            deferred, self._deferred = self._deferred, None
            try:
                published = deferred() if deferred is not None else None
                if published is not None:
                    self._save_and_publish(published)
                self._refresh_sources()
            finally:  # a push that raised must not hold the group's reports back
                self._run_after_push()

    def on_etcd_change(
        self,
        revision: int,
        puts: Mapping[str, bytes],
        deletes: Iterable[str],
        *,
        hold_tail: bool = False,
    ) -> None:
        """All events of one etcd revision: one change, accepted or rejected whole. A path
        in it that names no key (``train.lr``, ``train//lr``: ``etcd_path_fault``) is no
        part of the change: it is ignored with a warning (``etcd_path_ignored``), as every
        reader of etcd ignores it, and the keys beside it are taken or refused as if it
        were not there. A key outside the schema is part of the change, and refuses it.

        ``hold_tail``: if the change takes the short path, its work after the push is held
        for ``finish`` (the caller runs it soon; any other call runs it first). If this
        raises, nothing is held."""
        if self._closed:
            return
        self.finish()
        self._reported.edited((*puts, *deletes))
        self._hold_asked = hold_tail
        try:
            self._change(revision, puts, deletes)
        except BaseException:
            self.finish()
            raise
        finally:
            self._hold_asked = False

    def _change(self, revision: int, puts: Mapping[str, bytes], deletes: Iterable[str]) -> None:
        if not deletes and self._take_puts(revision, puts):
            return
        published = self._settle()  # the general path starts from built layers
        if published is not None:  # within a group: its state so far, unless one is accepted
            self._deferred = lambda: published
        current = self.layers["etcd"]
        values = dict(current.values)
        origins = dict(current.origins)
        edited: dict[str, Any] = {}
        for path in deletes:
            key = key_from_etcd(self.app, path)
            if key is not None and key in values:
                del values[key]
                origins.pop(key, None)
                edited[key] = None
        put: dict[str, Any] = {}
        problems: list[Problem] = []
        faults: list[Problem] = []
        read_etcd_values(self.app, puts, put, origins, problems, faults=faults)
        if faults:  # paths that name no key: ignored, each with a warning; the rest goes on
            self._in_order(partial(self._announce.ignored, revision, faults))
            if not put and not problems and not edited:
                return
        values.update(put)
        edited.update(put)
        edited.update((problem.key, None) for problem in problems)
        candidate = Layer("etcd", values, origins, tuple(problems))
        if not self._try_layer(candidate, revision, edited):
            self._reported.refused(puts)  # reported: each value stays in etcd, refused

    def on_files(self, files: Sequence[tuple[Path, Mapping[str, Any]]]) -> bool:
        """New parsed contents of the config files (the watcher has already deduplicated).
        True if they were taken whole. A file whose edit the schema refuses does not hold
        back the edits of the others (``files_apart``): theirs are taken, it keeps its
        contents in force and its refusal is announced, with its own reason, as any (once
        while it keeps the contents refused); False then, and ``files_rejected`` says why."""
        if self._closed:
            return False
        self.finish()
        taken = self._files.take(tuple(files), self.layers, self._files_refusal)
        if taken is None:
            return False
        layer, snapshot = taken
        before = self.layers["files"].values
        edited = changed_keys(before, layer.values)
        self.layers = {**self.layers, "files": layer}
        self._accept(snapshot, "files", self.revision, edited, before)
        return not self._files.refusing

    @property
    def refusing_files(self) -> bool:
        """Whether some config file's contents now are refused (``files_rejected``): a
        look-up cheap enough for every etcd change."""
        return self._files.refusing

    @property
    def files_rejected(self) -> str | None:
        """Why the config files' contents now are refused, each file that keeps its
        contents in force instead (``on_files``); None if none does."""
        return self._files.rejected

    def _files_refusal(self, error: InvalidChange, edited: Mapping[str, Any]) -> None:
        """Announce a refused edit of the config files (``ConfigFiles.take``) in order."""
        rejected = self._announce.rejected
        self._in_order(
            partial(rejected, "files", self.revision, self.version, error, edited, self._flat)
        )

    # --- internals -----------------------------------------------------------------------------

    def _take_puts(self, revision: int, puts: Mapping[str, bytes]) -> bool:
        """The usual live change, with the least work before the push: values put at leaves
        of the schema that no layer above etcd sets, while no restart-only key is held back.

        The candidate is the merged leaves with the new values, validated whole, as the
        general path validates it; its state is pushed first, and the etcd layer, the
        snapshot and the reports are built after (docs/performance-history.md: on this kind of
        machine each object built before the push cost the change microseconds). In a
        group commit the layer and the snapshot are built once, for the group's last such
        change (``_settle``), not for each revision.
        False, with nothing done: the general path takes the change (an invalid one,
        one that changes nothing, or one of another kind).
        """
        started = time.perf_counter()
        short = self._short
        if self._pending is None:  # else ``self.layers`` lags; ``short.leaves`` is current
            layers = tuple(self.layers.values())
            # Compared here, not in ``follow``: the usual change finds them equal, at no call.
            if layers != short.layers_of:
                short.follow(self.layers, layers)
        if short.leaves is None or self.snapshot is None or self._restart.pending:
            return False
        if self._pending is None and len(puts) == 1:
            [(path, raw)] = puts.items()
            lone = short.lone_put(path, raw, self.snapshot, self._room)
            if lone is not None:
                key, value, changes, growth = lone
                self._take_short(
                    revision,
                    {key: value},
                    {key: path},
                    changes.values,
                    changes.flat,
                    changes.changed,
                    growth,
                    changes.validated,
                    None,
                )
                self.last_change_seconds = time.perf_counter() - started
                return True
        pending = self._pending
        # The merged state the puts change: the snapshot's, or the group's newest. (Not
        # ``self._flat``: in a group, a restart-only key's new value may be merged but not
        # yet pending; merged, ``held_back`` sees it.)
        if pending is None:
            merged, merged_flat = self.snapshot.values, self.snapshot.flat
        else:
            merged, merged_flat = pending.values, self._flat
        taken = short.puts(puts, merged, merged_flat, self._flat, self._room)
        if taken is None:
            return False
        self._take_short(
            revision,
            taken.put,
            taken.origins,
            taken.values,
            taken.flat,
            taken.changed,
            taken.growth,
            taken.validated,
            taken.whole,
        )
        self.last_change_seconds = time.perf_counter() - started
        return True

    def _take_short(
        self,
        revision: int,
        put: dict[str, Any],
        origins: dict[str, str],
        values: dict[str, Any],
        flat: dict[str, Any],
        changed: dict[str, Any],
        growth: int,
        validated: Mapping[tuple[str, ...], Any],
        whole: BaseModel | None,
    ) -> None:
        """Take a change the short path accepted: ``values`` and ``flat`` are in force,
        ``validated`` holds the values validated alone, by path, and ``whole`` the model
        if the puts were validated with it instead. Pushed now, or at the group's end."""
        assert self.snapshot is not None
        before, self._flat = self._flat, flat
        self._room -= growth
        self.version += 1
        self.revision = max(self.revision, revision)
        pending = self._pending
        if pending is None:
            pending = self._pending = Pending(self.snapshot.model, values)
        pending.values = values
        if whole is not None:
            pending.model, pending.validated = whole, {}
        else:
            pending.validated.update(validated)
        pending.put.update(put)
        pending.origins.update(origins)
        self._after_push.append(
            partial(self._announce.accepted, "etcd", self.version, self.revision, changed, before)
        )
        if self._batching:  # the group's newest state is built and published at its end
            self._deferred = self._settle
        else:
            self._holding = self._hold_asked
            try:
                self._settle(push=self._save_and_publish)
            finally:
                self._then(self._run_after_push)
                self._holding = False

    def _settle(
        self, push: Callable[[Published, Mapping[str, Any]], None] | None = None
    ) -> Published | None:
        """Build what the short path left pending: the etcd layer with its puts, the
        snapshot and the state to publish, which ``push`` gets (with the etcd values to
        save) before the layer and the snapshot are built. None if nothing was pending.
        Called before anything else changes the version (the general path settles first).

        The layer and the snapshot are built even if ``push`` raises: the version, the
        values in force and ``current`` already are this state's, and the pending change
        is taken. Left unbuilt, they would keep the state before it, and the next change
        of the general path would start from that (publishing a value etcd no longer
        holds)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        assert self.snapshot is not None
        sources = dict(self.snapshot.sources)
        sources.update(dict.fromkeys(pending.put, "etcd"))
        etcd = self.layers["etcd"]
        etcd_values = {**etcd.values, **pending.put}
        published = Published(self.version, self.revision, pending.values, sources, self._flat)
        try:
            if push is not None:
                push(published, etcd_values)
        finally:
            self._then(partial(self._build, pending, etcd, etcd_values, sources))
        return published

    def _build(
        self,
        pending: Pending,
        etcd: Layer,
        etcd_values: dict[str, Any],
        sources: dict[str, str],
    ) -> None:
        """``_settle``'s etcd layer and snapshot, for the state already in force."""
        self.layers = {
            **self.layers,
            "etcd": Layer("etcd", etcd_values, {**etcd.origins, **pending.origins}),
        }
        self._short.layers_of = tuple(self.layers.values())  # its leaves: the same keys
        self.snapshot = Snapshot(
            model=pending.built_model,
            values=MappingProxyType(pending.values),
            flat=MappingProxyType(self._flat),
            sources=MappingProxyType(sources),
            layers=MappingProxyType(
                {name: self.layers[name].values for name in self.precedence if name in self.layers}
            ),
            precedence=self.precedence,
        )

    def _merge_sanitized(
        self,
        candidate: Layer,
        revision: int,
        kept: Mapping[str, Any] | None = None,
        *,
        raw: Mapping[str, bytes | str] | None = None,
    ) -> Snapshot:
        """Merge a whole etcd layer (a full read, or the saved values) and make it the etcd
        layer (``SanitizedRead.merge``: ``kept``, what this daemon ran before the read;
        ``raw``, the read's raw values). Raises ``InvalidChange`` only if the other layers
        are invalid without etcd."""
        layer, snapshot = self._full_reads.merge(
            self.layers, candidate, revision, self.version, self._flat, kept, raw=raw
        )
        self.layers["etcd"] = layer
        return snapshot

    def _try_layer(self, candidate: Layer, revision: int, edited: Mapping[str, Any]) -> bool:
        layers = dict(self.layers)
        layers[candidate.name] = candidate
        try:
            snapshot = merge_layers(self.schema, layers.values(), self.precedence)
            if candidate.name == "etcd" and self._files_above_etcd:
                under = shadowed_by_files(self.schema, self.precedence, list(layers.values()))
                under = [p for p in under if p.key in edited]  # not a value it holds already
                if under:
                    raise InvalidChange(under)
        except InvalidChange as exc:
            rejected = self._announce.rejected
            self._in_order(
                partial(rejected, candidate.name, revision, self.version, exc, edited, self._flat)
            )
            return False
        before, self.layers = self.layers[candidate.name].values, layers
        self._accept(snapshot, candidate.name, revision, edited, before)
        return True

    def _accept(
        self,
        snapshot: Snapshot,
        layer: str,
        revision: int,
        edited: Mapping[str, Any],
        before: Mapping[str, Any],
    ) -> None:
        """Take ``snapshot``, made by ``layer``'s change of the keys ``edited`` (to their new
        values; ``before``: that layer's values before it), and push it."""
        started = time.perf_counter()
        if revision:
            self.revision = max(self.revision, revision)
        # Warnings only: they wait until after the push (``_run_after_push``).
        warn = partial(self._announce.shadowed, snapshot, layer, edited, before)
        self._after_push.append(warn)
        self._after_push.append(partial(self._restart.track, snapshot, layer, self.revision))
        flat = dict(snapshot.flat)
        flat.update(self._restart.running)
        changed = changed_keys(self._flat, flat)
        if not changed:
            self.snapshot = snapshot
            if not self._batching:  # a group's state is published at its end, then this
                self._refresh_sources()
            if layer == "etcd" and revision:
                # The state in force is now etcd's at this revision too, unchanged (its
                # values were already in force, or a higher layer holds its keys).
                self._after_push.append(partial(self._on_unchanged, self.revision))
            if not self._batching:
                self._run_after_push()
            return
        before, self._flat = self._flat, flat
        self._room = room(snapshot.values, snapshot.flat, self._listed)
        self.version += 1
        self.snapshot = snapshot
        self._after_push.append(
            partial(self._announce.accepted, layer, self.version, self.revision, changed, before)
        )
        if self._batching:
            self._deferred = partial(self._published, snapshot, self.revision, flat)
        else:
            try:  # the state is in force before the push: a push that raises leaves it whole
                self._save_and_publish(self._published(snapshot, self.revision, flat))
            finally:
                self._run_after_push()
        self.last_change_seconds = time.perf_counter() - started

    def _refresh_sources(self) -> None:
        """After a change that moved a key's winning layer but no value (a file now sets
        what etcd does, to the same value): ``current`` takes the snapshot's ``sources``,
        which a client that connects is given. No version and no push: nothing changed
        that a client applies, and an update does not carry ``sources``."""
        current, snapshot = self.current, self.snapshot
        if current is None or snapshot is None or self._pending is not None or self.holds_tail:
            return  # a lone change's state not built yet: its own sources are current's
        if current.sources != snapshot.sources:
            self.current = replace(current, sources=dict(snapshot.sources))

    def _in_order(self, report: Callable[[], None]) -> None:
        """Run ``report`` (a change refused or ignored) now, or, within a group, after the
        reports of the changes before it, which wait for the group's push: the log and
        ``watch`` tell the changes in the order they came."""
        if self._batching:
            self._after_push.append(report)
        else:
            report()

    def _run_after_push(self) -> None:
        reports, self._after_push = self._after_push, []
        for report in reports:
            report()

    def _save_and_publish(
        self, published: Published, etcd: Mapping[str, Any] | None = None
    ) -> None:
        """Publish ``published`` and save it with ``etcd``'s values (default: the etcd
        layer's)."""
        self.current = published
        if self._keeper is None:
            self._publish(published)
        else:
            etcd = self.layers["etcd"].values if etcd is None else etcd
            self._keeper.publish(published, etcd, self._publish, then=self._then)

    def _published(
        self, snapshot: Snapshot, revision: int, flat: dict[str, Any] | None = None
    ) -> Published:
        """What clients get: ``snapshot`` with the restart-only keys at their running values
        (``flat``, if given, is already that, by dotted key)."""
        if flat is None:
            flat = dict(snapshot.flat)
            flat.update(self._restart.running)
        values = self._restart.in_force(snapshot.values, snapshot.flat)
        return Published(
            version=self.version,
            revision=revision,
            values=values,
            sources=dict(snapshot.sources),
            flat=flat,
        )
