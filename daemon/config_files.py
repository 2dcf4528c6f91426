"""The config files as the engine runs them: the contents in force, and what was said of
the contents it refused.

A new set of contents is checked over the layers in force and over the fixed layers
alone (``files_alone``). Where the schema refuses it, a file's edit does not hold back
the edits of the others (``files_apart``): each is tried on its own, the valid ones are
taken, and each refused file keeps its contents in force. A refusal is announced once
while the file keeps the refused contents (the next edit of another file tries them
again, and must not say it anew: watchers and the log would read it as a new bad edit),
and forgotten once the file no longer has them.

This is apart from the engine because it is the files' own bookkeeping: which contents
are in force (saved in the state file, to start on if the files are refused at a
restart) and which refusals stand (what the daemon reports as its files' problem). The
engine merges the files layer it is given as any layer's, and accepts the configuration
it makes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from hotknob.config import InvalidChange, Layer, Snapshot, changed_keys, files_layer, merge_layers
from hotknob.config.merge import files_alone

from .file_watcher import fingerprint
from .files_apart import Files, Refused, edited_files, take_apart
from .state_keeper import StateKeeper

Refuse = Callable[[InvalidChange, Mapping[str, Any]], None]
"""Announce the refusal of an edit of the files: why, and the keys it edited (to their
new values)."""


class ConfigFiles:
    """The config files of the engine of ``schema`` (see the module's docstring);
    ``keeper`` saves the contents in force with the state, if there is a state file."""

    def __init__(
        self, schema: type[BaseModel], precedence: Sequence[str], keeper: StateKeeper | None
    ) -> None:
        self._schema = schema
        self._precedence = tuple(precedence)
        self._keeper = keeper
        self.in_force: Files = ()
        """The config files' contents in force."""
        # Each config file that has refused contents now, with those contents, announced,
        # and why they are refused: not announced again while the file keeps them (another
        # file's edit tries it again: ``files_apart``); gone once it no longer has them.
        self._said: dict[Path, tuple[Hashable, str]] = {}

    @property
    def refusing(self) -> bool:
        """Whether some config file's contents now are refused."""
        return bool(self._said)

    @property
    def rejected(self) -> str | None:
        """Why the config files' contents now are refused; None if none are."""
        reasons = dict.fromkeys(reason for _, reason in self._said.values())
        return "; ".join(reasons) or None

    def run_on(self, files: Sequence[tuple[Path, Mapping[str, Any]]]) -> Layer:
        """The files layer of ``files``, whose contents are now in force; the state file
        saves them."""
        self.in_force = tuple(files)
        layer = files_layer(self._schema, files)
        if self._keeper is not None:
            self._keeper.files_in_force(files)
        return layer

    def refused_at_start(
        self,
        files: Sequence[tuple[Path, Mapping[str, Any]]],
        ran: Mapping[Path, Mapping[str, Any]],
        reason: str,
    ) -> None:
        """The files ``files`` were refused at the start, for ``reason``, which ran on their
        saved contents ``ran`` instead: said then, and in ``status``, so that the next edit
        of another file does not say it again."""
        self._said = {
            path: (fingerprint(contents), reason)
            for path, contents in files
            if fingerprint(contents) != fingerprint(ran.get(path, {}))
        }

    def take(
        self, files: Files, layers: Mapping[str, Layer], refuse: Refuse
    ) -> tuple[Layer, Snapshot] | None:
        """New contents of the config files, over the layers in force ``layers``: the files
        layer to put in force and the configuration it makes, with the edits of ``files``
        it can take (all, or those of the files whose edits the schema does not refuse);
        None if it takes none. Each refusal is announced by ``refuse``, with its own
        reason, but one of contents already announced that the files still have."""
        now = given = files
        checked = self._check(now, layers)
        if isinstance(checked, InvalidChange):
            apart = take_apart(self.in_force, now, lambda tried: self._error(tried, layers))
            # Each file with its own reason, even where none is taken: a file refused and
            # said before, unchanged, is no part of another file's refusal.
            refused = apart.refused or (
                Refused(tuple(edited_files(self.in_force, now)), checked, now),
            )
            self._refused(refused, refuse)
            if not apart.taken:
                self._still_refused(given)
                return None
            now, checked = apart.files, self._check(apart.files, layers)
            assert not isinstance(checked, InvalidChange)  # ``take_apart`` checked it
        self.in_force = now
        self._still_refused(given)
        if self._keeper is not None:
            self._keeper.files_in_force(now)
        return checked

    def alone(self, files: Layer, layers: Mapping[str, Layer]) -> None:
        """``files_alone``: the files layer ``files`` must be valid over the fixed layers
        below it alone, not only with what etcd, env and ``--set`` shadow now."""
        files_alone(self._schema, [*layers.values(), files], self._precedence)

    def _still_refused(self, files: Files) -> None:
        """Forget the refusals of the files ``files`` no longer hold refused: fixed (back
        to the contents in force too), edited since, or taken now."""
        now = {path: fingerprint(contents) for path, contents in files}
        in_force = {path: fingerprint(contents) for path, contents in self.in_force}
        self._said = {
            path: (seen, reason)
            for path, (seen, reason) in self._said.items()
            if now.get(path) == seen and in_force.get(path) != seen
        }

    def _check(
        self, files: Files, layers: Mapping[str, Layer]
    ) -> tuple[Layer, Snapshot] | InvalidChange:
        """The files layer of ``files`` and the configuration it makes, or why it is not
        valid (over the layers in force, and over the fixed layers alone)."""
        layer = files_layer(self._schema, files)
        try:
            snapshot = merge_layers(
                self._schema, {**layers, "files": layer}.values(), self._precedence
            )
            self.alone(layer, layers)
        except InvalidChange as exc:
            return exc
        return layer, snapshot

    def _error(self, files: Files, layers: Mapping[str, Layer]) -> InvalidChange | None:
        checked = self._check(files, layers)
        return checked if isinstance(checked, InvalidChange) else None

    def _refused(self, refused: Sequence[Refused], refuse: Refuse) -> None:
        """Announce each refusal of ``refused``, but one of contents already announced
        that the files still have."""
        in_force = dict(self.in_force)
        for refusal in refused:
            tried = dict(refusal.tried)
            seen = {path: fingerprint(tried[path]) for path in refusal.paths}
            said = all(self._said.get(p, (None,))[0] == f for p, f in seen.items())
            self._said.update((p, (f, str(refusal.error))) for p, f in seen.items())
            if seen and said:
                continue
            before = tried | {path: in_force.get(path, {}) for path in refusal.paths}
            edited = changed_keys(
                files_layer(self._schema, list(before.items())).values,
                files_layer(self._schema, refusal.tried).values,
            )
            refuse(refusal.error, edited)
