"""The config files, from their watcher and SIGHUP to the engine and the clients.

The files layer reaches the engine along its own path, apart from etcd's: the files
are read once at the start (one that cannot be read then starts as it was when the
daemon last ran, from the state file) and watched from there; each edit is handed to
the engine on the event loop; a file that cannot be read changes nothing, and says why
to the log, the status entries and ``watch`` clients; SIGHUP re-reads them, one re-read
at a time; and files refused beside an etcd value are offered again when etcd changes.

It is apart from the daemon because none of it is the daemon's assembly or lifecycle:
the daemon creates it, calls ``start`` once the engine exists, and stops its watcher
with the other components. The engine keeps what the files hold and which of their
contents it refuses (``config_files``); this is only how their events come to it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import signals
from .engine import Engine
from .feedback import ClientFeedback
from .file_watcher import FileLayerState, FileLayerWatcher


class FilesFeed:
    """The daemon's config files (``paths``, none: no watcher at all).

    ``post(fn, *args)`` runs ``fn(*args)`` on the loop soon (thread-safe); ``lock`` is
    the daemon's, held while the engine is used; ``broadcast`` sends an event to
    ``watch`` clients; ``started()`` says whether the daemon's start ended, and until it
    does an edit waits in ``early``, which the daemon replays in order with the other
    events that came early; ``stopping`` ends a run of re-reads."""

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        lock: threading.RLock,
        post: Callable[..., None],
        broadcast: Callable[[dict[str, Any]], None],
        feedback: ClientFeedback,
        started: Callable[[], bool],
        early: list[Callable[[], None]],
        stopping: asyncio.Event,
        log: Any,
    ) -> None:
        self._paths = paths
        self._lock = lock
        self._post = post
        self._broadcast = broadcast
        self._feedback = feedback
        self._started = started
        self._early = early
        self._log = log
        self._engine: Engine | None = None
        self.watcher: FileLayerWatcher | None = None
        self._rereads = signals.Rereads(self._reread, stopping)  # on SIGHUP

    def start(self, engine: Engine, ran: Mapping[Path, Mapping[str, Any]]) -> FileLayerState:
        """Read and watch the config files; one that cannot be read starts as it was when
        the daemon last ran (``ran``, from the state file), if it holds that file."""
        self._engine = engine
        if not self._paths:
            return FileLayerState(files=())
        self.watcher = FileLayerWatcher(
            list(self._paths),
            on_change=lambda state: self._post(self._on_files, state),
            on_error=lambda path, exc: self._post(self._on_file_error, path, exc),
            on_readable=lambda: self._post(self._feedback.config_files_problem, "unreadable", None),
        )
        return self.watcher.start(ran)

    def refused_at_start(self) -> None:
        """Say what the start refused of the config files, and ran without: a file it could
        not read, or files that made the configuration invalid (``Engine.start``)."""
        assert self._engine is not None
        unreadable = self.watcher.unreadable_at_start if self.watcher is not None else {}
        for path, reason in unreadable.items():
            self._log.warning(
                "config_file_unreadable_at_start",
                path=str(path),
                reason=reason,
                detail="started on the contents it had when this daemon last ran",
            )
        if unreadable:
            self._feedback.config_files_problem("unreadable", "; ".join(unreadable.values()))
        if self._engine.files_refused is not None:
            self._feedback.config_files_problem("rejected", self._engine.files_refused)

    def reread(self) -> None:
        """On the loop, for SIGHUP: re-read the config files (one re-read at a time:
        ``Rereads``); nothing before the start has a watcher."""
        if self.watcher is not None:
            self._rereads.request()

    def _reread(self) -> None:
        """On a worker thread (``Rereads``)."""
        files = self.watcher
        assert files is not None
        try:
            files.reload()  # what changed on disk reaches ``_on_files`` as usual
            # And what the files say is offered again, changed or not: contents the
            # engine rejected before may fit now (another layer changed since).
            self._post(self._on_files, files.state)
        finally:
            self._post(self._rereads.done)

    def again(self) -> None:
        """Under the daemon's lock, after an etcd change: config files refused now are
        offered again, as a SIGHUP does. A file value refused beside an etcd value
        (``band.hi`` below etcd's ``band.lo``) fits once etcd drops that value, and no
        edit of the file would come to take it."""
        engine, files = self._engine, self.watcher
        if files is not None and engine is not None and engine.refusing_files:
            self._post(self._on_files, files.state)

    def _on_files(self, state: FileLayerState) -> None:
        if not self._started():
            self._early.append(lambda: self._on_files(state))
            return
        assert self._engine is not None
        with self._lock:
            self._engine.on_files(state.files)
            rejected = self._engine.files_rejected
        # A file that cannot be read may be in it with its last good contents: the watcher
        # says when every file reads again (``on_readable``). What is refused now is each
        # file's reason, which no later edit of another file leaves stale.
        self._feedback.config_files_problem("rejected", rejected)

    def _on_file_error(self, path: Path, exc: Exception) -> None:
        """A config file that cannot be read (not valid YAML, gone, too deep): nothing
        changes, and ``watch`` clients hear of it as well as the log (``file_invalid``), so
        that whoever is editing the file sees why the edit did not land."""
        if not self._started() or self._engine is None:
            return  # before the start the log line is all there is: no watcher yet
        reason = str(exc) if str(path) in str(exc) else f"{path}: {exc}"  # the path once
        self._feedback.config_files_problem("unreadable", reason)
        current = self._engine.current
        self._broadcast(
            {
                "type": "event",
                "event": "file_invalid",
                "layer": "files",
                "path": str(path),
                "reason": str(exc),
                "version": current.version if current is not None else None,
                "time": time.time(),
            }
        )
