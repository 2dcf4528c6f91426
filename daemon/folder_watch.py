"""The folders that a set of config files is watched through, kept the ones the files are
in now.

A file is watched through the folder that holds it (``file_watcher`` says why), and
that folder can change under the watcher: a symlink swapped to a file in another folder,
a folder deleted and made again, renamed away, or reached through a link since swapped.
This holds the watchdog side of it: which folders the files need watched, the events of
interest turned into signals (``_Signal``), the watches begun and given up as the files
move, a folder that cannot be watched tried again, and the names events give the files
by. It is apart from the watcher because none of it reads a file or decides what
changed: the watcher reads and compares, debounced, and asks this, under its check
lock, to ``follow`` the files once each check is done.

Log events: ``config_folder_watch_failed``, ``config_folders_watched``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.utils import UnsupportedLibcError

# Opened and closed-without-write are left out: they are what our own reads cause. Attribute
# changes stay in: a chmod can make an unreadable file readable.
_EVENTS_OF_INTEREST: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    FileAttribEvent,
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
]


def _reports_closes(observer: Any) -> bool:
    """Whether ``observer`` reports a file closed after a write (inotify does; others don't)."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except (ImportError, UnsupportedLibcError):  # not on this platform
        return False
    return isinstance(observer, InotifyObserver)


class _Signal(FileSystemEventHandler):
    """Turns every event delivered to it into one call of ``notify(complete)``.

    ``complete`` is True for a rename onto one of ``targets``: an atomic save (or a
    ConfigMap ``..data`` swap) has finished, so the file can be read at once. Before
    that, ``written(path, closed)`` is told of each write to a file and each close
    after one.
    """

    def __init__(
        self,
        notify: Callable[[bool], None],
        written: Callable[[str, bool], None],
        targets: frozenset[str],
    ):
        self._notify = notify
        self._written = written
        self.targets = targets  # replaced whole when the watched folders change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileModifiedEvent | FileClosedEvent):
            self._written(os.fsdecode(event.src_path), isinstance(event, FileClosedEvent))
        elif isinstance(event, FileDeletedEvent | FileMovedEvent):
            # The name now leads to another file (renamed onto) or to none: a writer that
            # still holds the old one is not writing what the name holds.
            self._written(os.fsdecode(event.src_path), True)
            if isinstance(event, FileMovedEvent):
                self._written(os.fsdecode(event.dest_path), True)
        dest = getattr(event, "dest_path", "")
        self._notify(bool(dest) and os.fsdecode(dest) in self.targets)


def _targets(paths: Sequence[Path], folders: Sequence[Path]) -> frozenset[str]:
    """The names a rename onto which finishes a save: each file, and each folder's ``..data``."""
    targets = {os.path.abspath(p) for p in paths}
    targets.update(os.path.join(folder, "..data") for folder in folders)
    return frozenset(targets)


def event_names(paths: Sequence[Path]) -> frozenset[str]:
    """The names events may give each file by: as given, and where a symlink leads."""
    return frozenset(name for p in paths for name in (os.path.abspath(p), os.path.realpath(p)))


_FOLDER_RETRY_S = 0.5  # how often a folder that cannot be watched (not there) is tried


def _inode(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_ino
    except OSError:
        return None


def _watched_folders(paths: Sequence[Path]) -> list[Path]:
    """The folder of each path, plus the real file's folder when a symlink leads elsewhere.

    A symlink into a subfolder of its own folder (the ConfigMap layout) needs no
    extra watch: the swap of ``..data`` happens in the link's own folder.
    """
    folders: list[Path] = []
    for path in paths:
        folder = Path(os.path.abspath(path)).parent
        candidates = [folder]
        real_folder = Path(os.path.realpath(path)).parent
        if not real_folder.is_relative_to(Path(os.path.realpath(folder))):
            candidates.append(real_folder)
        for candidate in candidates:
            if candidate not in folders:
                folders.append(candidate)
    return folders


def _watch(observer: Any, handler: FileSystemEventHandler, folder: Path) -> Any:
    """Watch ``folder`` itself, even where its path ends in a symlink (``conf -> /srv/conf``).

    Not following it, inotify would watch the link and not the folder it leads to, and
    no save of a file in there would ever be seen. Its events still name the files by
    the path given, and a swap of the link is found as a folder renamed above is."""
    return observer.schedule(
        handler,
        str(folder),
        recursive=False,
        event_filter=_EVENTS_OF_INTEREST,
        follow_symlink=True,
    )


class FolderWatches:
    """The watches of one set of files' folders, through one watchdog observer; ``start``
    once, ``stop`` idempotently. Not locked: the watcher calls ``follow`` and ``moved``
    under its check lock."""

    def __init__(
        self,
        where: Sequence[Path],
        signal: Callable[[bool], None],
        written: Callable[[str, bool], None],
        retry_at: Callable[[float], None],
        log: Any,
    ):
        """``where``: the files (absolute paths). ``signal`` and ``written`` are told of
        their folders' events (see ``_Signal``), ``signal(False)`` also once a folder is
        watched anew, and ``retry_at`` when to look again for a folder not watchable now."""
        self._where = where
        self._signal = signal
        self._written = written
        self._retry_at = retry_at
        self._log = log
        self._observer: Any = None
        self._handler: _Signal | None = None
        self._watches: dict[Path, Any] = {}
        self._watch_inodes: dict[Path, int | None] = {}  # of each folder, when its watch began
        # Logged once each, not at every retry: the folders that cannot be watched now,
        # and the folders watched as last logged.
        self._unwatchable: set[Path] = set()
        self._logged_watches: list[str] | None = None
        self.reports_closes = False  # see ``_reports_closes``; known once started

    def start(self) -> None:
        """Watch the folders the files are in. Raises ``OSError`` (and watches nothing)."""
        observer = Observer()
        folders = _watched_folders(self._where)
        signal = _Signal(self._signal, self._written, _targets(self._where, folders))
        watches = {}
        try:
            for folder in folders:
                watches[folder] = _watch(observer, signal, folder)
            observer.start()
        except OSError:
            observer.unschedule_all()
            raise
        self._observer, self._handler, self._watches = observer, signal, watches
        self._watch_inodes = {folder: _inode(folder) for folder in watches}
        self.reports_closes = _reports_closes(observer)

    def stop(self) -> None:
        """Stop watching; joins the observer's threads. Idempotent."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()

    def moved(self) -> bool:
        """Whether the files are in other folders now, or a watched folder's path no longer
        names the folder watched."""
        return set(_watched_folders(self._where)) != set(self._watches) or bool(self._gone())

    def _gone(self) -> list[Path]:
        """The watched folders whose path names another folder now, or none: deleted (the
        watch went with it), renamed away, or reached through a symlink since swapped."""
        return [f for f, ino in self._watch_inodes.items() if _inode(f) != ino]

    def follow(self) -> None:
        """Watch the folders the files are in now, and only those.

        A symlink swapped to a file in another folder (``ln -sfn``, a rename of a new
        link) moves the real file out of the folders watched so far: its folder is
        watched from now on, the old one no longer, and the files are read once more,
        so an edit made before the new watch was in place is not lost. A folder deleted
        (and maybe made again) is watched anew; one that cannot be watched (not there)
        is tried again every ``_FOLDER_RETRY_S``, and logged once, not at every try.
        """
        observer, handler = self._observer, self._handler
        if observer is None or handler is None:
            return
        folders = _watched_folders(self._where)
        gone = self._gone()
        if set(folders) == set(self._watches) and not gone:
            return
        for folder in [f for f in self._watches if f not in folders or f in gone]:
            watch = self._watches.pop(folder)
            self._watch_inodes.pop(folder, None)
            try:
                observer.unschedule(watch)
            except (KeyError, OSError):  # already gone with its folder
                pass
        added = unwatched = False
        for folder in folders:
            if folder in self._watches:
                continue
            try:
                self._watches[folder] = _watch(observer, handler, folder)
            except OSError as exc:
                if folder not in self._unwatchable:
                    self._unwatchable.add(folder)
                    self._log.warning(
                        "config_folder_watch_failed",
                        folder=str(folder),
                        error=str(exc),
                        retry_every_s=_FOLDER_RETRY_S,
                    )
                unwatched = True
                continue
            self._unwatchable.discard(folder)
            self._watch_inodes[folder] = _inode(folder)
            added = True
        self._unwatchable &= set(folders)
        handler.targets = _targets(self._where, folders)
        watched = [str(f) for f in self._watches]
        if watched != self._logged_watches:
            self._logged_watches = watched
            self._log.info("config_folders_watched", folders=watched)
        if added:
            self._signal(False)
        if unwatched:  # no event can come from there: look again in a while
            self._retry_at(time.monotonic() + _FOLDER_RETRY_S)
