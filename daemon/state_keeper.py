"""The engine's side of the state file: when each accepted state is saved, and how.

``StateStore`` (``state.py``) and ``StateWriter`` (``state_writer.py``) do the writing;
this decides what the engine's states need of them, so that versions keep increasing
across restarts:

- no version is published above the ceiling on disk: a state that would be is saved
  first, synchronously, with a ceiling ``VERSION_BLOCK`` above it (once per block);
- any other state is saved after its push, by the writer's thread, coalesced;
- at a clean stop the final state is saved synchronously, marked clean.

A failed write is kept in ``error`` (for ``/healthz``), never raised: the daemon keeps
serving, and the next change tries again. Once a reservation has failed, the versions
published are not reserved, whatever a try does to the next change: until a save
succeeds, the writer's thread tries again (with the ceiling raised) after each push, so
that no change waits for a disk that fails slowly (EIO after its retries, a hung mount).

A failure is logged (``state_write_failed``) when writes start failing, when the reason
changes and at most every ``STATE_WRITE_WARN_EVERY_S`` while they go on, with the count
of those not logged; ``state_write_recovered`` once one succeeds again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from .published import Published
from .state import VERSION_BLOCK, StateStore
from .state_format import SavedState
from .state_writer import StateWriter
from .throttle import Repeats

STATE_WRITE_WARN_EVERY_S = 60.0
"""While the state cannot be written, each change tries again (a stream of changes brings
hundreds of tries a second): ``state_write_failed`` is logged when that starts, when its
reason changes, and then at most this often."""


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
        self._failing = Repeats(STATE_WRITE_WARN_EVERY_S)
        # The first version published above the ceiling on disk since a reservation
        # failed; None once a save succeeds. Set and read on several threads: a stale
        # read costs one try more on the engine's thread, or one on the writer's.
        self._unreserved: int | None = None
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
        if published.version > self.store.ceiling and self._unreserved is None:
            self.reserve(published, etcd)
            push(published)
            return
        push(published)
        # After the push: the writer's thread then competes with nothing on the way out.
        ceiling = self.store.ceiling
        if published.version > ceiling:  # a reservation failed: the writer tries again
            ceiling = published.version + VERSION_BLOCK
        then(partial(self._writer.submit, self._saved(published, etcd, ceiling=ceiling)))

    def reserve(self, published: Published, etcd: Mapping[str, Any]) -> None:
        """Save ``published`` now, with a ceiling ``VERSION_BLOCK`` above it. On failure the
        ceiling stays, and the writer tries again with the next change (``publish``); the
        change is still published, as the daemon must keep serving."""
        try:
            self.store.save(self._saved(published, etcd, ceiling=published.version + VERSION_BLOCK))
        except Exception as exc:  # OSError, or a bug: either way the change is published
            if self._unreserved is None:
                self._unreserved = published.version
            self._write_failed(exc)
            return
        self._write_succeeded()

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
        except Exception as exc:
            self._write_failed(exc, last=True)
        else:
            self._write_succeeded()

    def _on_saved(self, error: Exception | None) -> None:
        """The writer's report, on its thread."""
        if error is None:
            self._write_succeeded()
        else:
            self._write_failed(error)

    def _write_failed(self, exc: Exception, *, last: bool = False) -> None:
        """``last``: the final save, said whatever the time (with the count of the
        failures not said before it)."""
        unreserved = self._unreserved
        if isinstance(exc, OSError):
            self.error = f"{self.store.path}: {exc.strerror or exc}"
        else:  # no input is known to bring one: say what it was, as the writer does
            self.error = f"{self.store.path}: not saved: {type(exc).__name__}: {exc}"
        # By ``error``, not the exception's text: that names the save's temp file, new
        # at each try. A reservation's failure is a new one: versions are at stake now.
        reason = self.error if unreserved is None else f"{self.error} (reservation)"
        counts = self._failing.failed(reason, say=last)
        if counts is None:
            return
        fields: dict[str, Any] = {}
        if unreserved is not None:
            fields["versions"] = (
                f"{unreserved} and later are not reserved on disk: a daemon restarted "
                "before the state is saved again may publish them again, with other values"
            )
        self._log.error(
            "state_write_failed",
            path=str(self.store.path),
            error=str(exc) if isinstance(exc, OSError) else self.error,
            **counts,
            **fields,
        )

    def _write_succeeded(self) -> None:
        self.error = None
        self._unreserved = None
        counts = self._failing.succeeded()
        if counts is not None:
            self._log.info("state_write_recovered", path=str(self.store.path), **counts)

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
