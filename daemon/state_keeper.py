"""The engine's side of the state file: when each accepted state is saved, and how.

``StateStore`` and ``StateWriter`` (``state.py``) do the writing; this decides what the
engine's states need of them, so that versions keep increasing across restarts:

- no version is published above the ceiling on disk: a state that would be is saved
  first, synchronously, with a ceiling ``VERSION_BLOCK`` above it (once per block);
- any other state is saved after its push, by the writer's thread, coalesced;
- at a clean stop the final state is saved synchronously, marked clean.

A failed write is logged (``state_write_failed``) and kept in ``error`` (for
``/healthz``), never raised: the daemon keeps serving, and the next change tries again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from .published import Published
from .state import VERSION_BLOCK, SavedState, StateStore, StateWriter


def _now(step: Callable[[], None]) -> None:
    step()


class StateKeeper:
    def __init__(self, store: StateStore, log: Any) -> None:
        self.store = store
        self.files: tuple[tuple[str, Mapping[str, Any]], ...] = ()
        """The config files' contents in force, by path, saved with each state (set with
        ``files_in_force`` when the files layer in force changes)."""
        self.error: str | None = None  # the last write's failure, until a write succeeds
        self._log = log
        self._writer = StateWriter(store, self._on_saved)

    def load(self) -> SavedState | None:
        """The saved state, if any. A file that could not be read was set aside: not fatal
        (a daemon must come up), but loud, since versions restart at 1 below what clients
        and checkpoints may hold (docs/reliability.md says what to do)."""
        saved = self.store.load()
        aside = self.store.set_aside
        if aside is not None:
            self._log.error(
                "state_file_unreadable",
                path=str(aside.path),
                reason=aside.reason,
                moved_to=str(aside.moved_to) if aside.moved_to else None,
                move_error=aside.move_error,
                versions="restart at 1",
            )
        return saved

    def publish(
        self,
        published: Published,
        etcd: Mapping[str, Any],
        push: Callable[[Published], None],
        then: Callable[[Callable[[], None]], None] = _now,
    ) -> None:
        """``push`` ``published`` and save it with ``etcd`` (the etcd values it came from):
        first if its version is above the ceiling, else after the push, when ``then``
        runs the save it is given (at once, by default)."""
        if published.version > self.store.ceiling:
            self.reserve(published, etcd)
            push(published)
        else:
            push(published)
            # After the push: the writer's thread then competes with nothing on the way out.
            saved = self._saved(published, etcd, ceiling=self.store.ceiling)
            then(partial(self._writer.submit, saved))

    def reserve(self, published: Published, etcd: Mapping[str, Any]) -> None:
        """Save ``published`` now, with a ceiling ``VERSION_BLOCK`` above it. On failure the
        ceiling stays, so the next change tries again; the change is still published, as
        the daemon must keep serving."""
        try:
            self.store.save(self._saved(published, etcd, ceiling=published.version + VERSION_BLOCK))
        except OSError as exc:
            self._write_failed(exc)
            return
        self.error = None

    def files_in_force(self, files: Sequence[tuple[Path, Mapping[str, Any]]]) -> None:
        """Save ``files`` (each config file's parsed contents) with the next states, as JSON
        holds them: a YAML or TOML date as its ISO text, which the schema reads back as
        the date. Contents JSON cannot hold at all (a NaN nobody validated) are not saved:
        a restart then has no contents of those files to start on."""
        try:
            self.files = tuple(
                (str(path), json.loads(json.dumps(contents, default=str, allow_nan=False)))
                for path, contents in files
            )
        except (TypeError, ValueError):
            self.files = ()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the writer has saved what was submitted; False on timeout."""
        return self._writer.flush(timeout)

    def close(self, current: Published | None, etcd: Mapping[str, Any]) -> None:
        """Stop the writer, then save ``current`` (the final state) synchronously, marked
        clean: nothing is published after it, so a restart on the same values may keep its
        version."""
        self._writer.close()
        if current is None:
            return
        try:
            self.store.save(self._saved(current, etcd, ceiling=self.store.ceiling, clean=True))
        except OSError as exc:
            self._write_failed(exc)

    def _on_saved(self, error: OSError | None) -> None:
        """The writer's report, on its thread."""
        if error is None:
            self.error = None
        else:
            self._write_failed(error)

    def _write_failed(self, exc: OSError) -> None:
        self.error = f"{self.store.path}: {exc.strerror or exc}"
        self._log.error("state_write_failed", path=str(self.store.path), error=str(exc))

    def _saved(
        self, published: Published, etcd: Mapping[str, Any], *, ceiling: int, clean: bool = False
    ) -> SavedState:
        return SavedState(
            version=published.version,
            revision=published.revision,
            values=published.values,
            etcd=dict(etcd),
            files=self.files,
            version_ceiling=ceiling,
            clean=clean,
        )
