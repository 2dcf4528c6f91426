"""Watch config files through their folders and report each real content change once.

A file is watched through the folder that holds it, never through its inode:
an editor's write-then-rename, an in-place write, ``git checkout`` and a
Kubernetes ConfigMap ``..data`` symlink swap all replace or rewrite what the
*name* points at, and only the folder sees every one of those. Any event in a
watched folder (other than a mere open or read) is only a signal: after a quiet
moment (the debounce) every file is read again and the result is compared with
the last good state. So:

- a save that emits several filesystem events is one change, and a ``touch``
  is none (the parsed contents are equal);
- a half-written or unparsable file changes nothing: ``on_error`` is told once it
  still does not parse ``debounce_s`` later (a read may meet a writer between its
  truncate and its write), and its last good contents stay in force until it
  parses again (``on_readable`` is
  told once every file parses, whether or not its contents changed); meanwhile a
  change to another watched file is reported as usual, with the unparsable file's
  last good contents, and ``on_error`` is told of that file again after it;
- a file written in place is read once its writer closes it, not while a slow
  writer pauses (where the platform reports closes: inotify does), or at the
  latest ``close_wait_s`` after the first write, should the writer keep it open;
  meanwhile a change to another watched file is reported as usual, with the held
  file's last contents (an explicit ``reload``, SIGHUP, waits for the close too);
- a file that is briefly absent (deleted mid-rename) is waited for: no change is
  reported until it is back, for at most ``missing_grace_s``; still missing then,
  it is an error, and is taken as an unparsable file is;
- a folder above the files renamed, replaced or reached through a symlink that is
  swapped (a release folder's ``current`` link) sends no event into the folders
  watched: while all is quiet they are looked at every ``_FOLDER_POLL_S``, and a
  path that names another folder now is watched anew and its files read at once;
- a file written through another name for it, which sends no event into its folder (a
  file bind-mounted into a container and edited on the host, a hard link), is found
  changed by its size and times, looked at with the folders while all is quiet;
- a relative path names the file from the folder the watcher was made in, for good.

The folders' watches are kept by ``folder_watch``; how long a file that cannot be read
is waited for, by ``read_grace``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from hotknob.config.errors import LayerError
from hotknob.config.files import read_config_file

from .folder_watch import FolderWatches, event_names
from .read_grace import ReadGraces


@dataclass(frozen=True)
class FileLayerState:
    """Each watched file with its parsed contents, in the order given (a later file wins)."""

    files: tuple[tuple[Path, Mapping[str, Any]], ...]


def fingerprint(value: Any) -> Hashable:
    """A comparable form of parsed contents that tells ``1``, ``1.0`` and ``true`` apart.

    Recursive: ``read_config_file`` returns nothing nested more than ``MAX_FILE_DEPTH``
    levels deep (a ``read_file`` given in its place must keep to that too)."""
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((repr(k), fingerprint(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return ("list", tuple(fingerprint(v) for v in value))
    return (type(value).__qualname__, repr(value))


_FOLDER_POLL_S = 1.0  # how often, when all is quiet, the watched folders are looked at


def _file_stat(path: Path) -> tuple[int, ...] | None:
    """What tells, without reading it, that a file may hold something new: the file the
    name leads to, its size and its times; None if it cannot be looked at."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileLayerWatcher:
    """Watches config files through their folders with watchdog; reports each real change once.

    ``on_change``, ``on_error`` and ``on_readable`` run on the watcher's own thread (or on the
    caller's, for ``reload``), one at a time and in order; they must not block
    for long. ``on_change`` gets the whole new state, never a partial one: a file that
    cannot be read is in it with its last good contents. So that a listener that takes
    ``on_change`` for "every file reads" is not misled, ``on_error`` is told again after it
    of each file that does not.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        on_change: Callable[[FileLayerState], None],
        *,
        on_error: Callable[[Path, Exception], None] | None = None,
        on_readable: Callable[[], None] | None = None,
        debounce_s: float = 0.05,
        settle_s: float = 0.01,
        max_wait_s: float = 0.5,
        missing_grace_s: float = 0.5,
        close_wait_s: float = 2.0,
        read_file: Callable[[Path], Mapping[str, Any]] = read_config_file,
        log: Any = None,
    ):
        if not paths:
            raise ValueError("FileLayerWatcher needs at least one path")
        self._paths = tuple(Path(p) for p in paths)
        # Where each file is read and watched: a relative path names a file from the folder
        # the daemon started in, for good, even once that folder is deleted or replaced.
        self._where = tuple(Path(os.path.abspath(p)) for p in self._paths)
        self._on_change = on_change
        self._on_error = on_error
        self._on_readable = on_readable
        self._debounce_s = debounce_s
        self._settle_s = min(settle_s, debounce_s)
        self._max_wait_s = max(max_wait_s, debounce_s)
        self._close_wait_s = max(close_wait_s, 0.0)
        self._read_file = read_file
        self._log = log if log is not None else structlog.get_logger(__name__)

        self._state: FileLayerState | None = None
        self.unreadable_at_start: dict[Path, str] = {}  # files ``start`` took as they ran
        self._fingerprint: Hashable = None
        self._check_lock = threading.RLock()
        self._reported: dict[Path, Exception] = {}  # a file that cannot be read, and why
        self._graces = ReadGraces(missing_grace_s, self._debounce_s, self._recheck_at)
        self._file_stats: dict[Path, tuple[int, ...] | None] = {}  # as each was last read

        self._cond = threading.Condition()
        self._due: float | None = None
        self._first_event: float | None = None
        self._early_due: float | None = None
        self._names = event_names(self._where)
        self._open_since: dict[str, float] = {}  # a watched file written, not yet closed
        self._await_close = False
        self._stopping = False
        self._folders = FolderWatches(
            self._where, self._signal, self._written, self._recheck_at, self._log
        )
        self._worker: threading.Thread | None = None

    @property
    def state(self) -> FileLayerState:
        if self._state is None:
            raise RuntimeError("FileLayerWatcher.start() has not been called")
        return self._state

    def start(self, ran: Mapping[Path, Mapping[str, Any]] | None = None) -> FileLayerState:
        """Read every file once, then watch their folders; returns the initial state.

        Raises ``LayerError`` (and starts nothing) if any file is missing or
        unreadable, unless ``ran`` holds contents for it (what the file held when the
        daemon last ran): then those stand for it, the problem is kept in
        ``unreadable_at_start`` (by path, why) and reported as any later one (``on_error``
        is not called for it), and the file is read again at its next event. A change made
        between the first read and the watch being in place is not lost: the files are
        read once more as soon as it is.
        """
        if self._state is not None or self._stopping:
            raise RuntimeError("a FileLayerWatcher can be started once, and not after stop()")
        files = []
        for path, where in zip(self._paths, self._where, strict=True):
            try:
                files.append((path, self._read_file(where)))
            except (LayerError, OSError) as exc:
                error = exc if isinstance(exc, LayerError) else None
                reason = str(exc) if error else f"{path}: cannot read: {exc}"
                if ran is None or path not in ran:
                    if error is not None:
                        raise
                    raise LayerError("files", reason) from exc
                files.append((path, ran[path]))
                self.unreadable_at_start[path] = reason
                self._reported[path] = exc  # said again only if it changes; cleared on a read
        initial = FileLayerState(tuple(files))

        try:
            self._folders.start()
        except OSError as exc:
            raise LayerError("files", f"cannot watch config folders: {exc}") from exc
        self._swap(initial)
        self._await_close = self._folders.reports_closes
        self._worker = threading.Thread(target=self._run, name="hotknob-file-watcher", daemon=True)
        self._worker.start()
        self._signal()
        self._log.info("config_files_watched", paths=[str(p) for p in self._paths])
        return self.state

    def reload(self) -> None:
        """Read every file now (SIGHUP); report a change only if the contents differ.

        Unlike a filesystem event, an explicit reload reports a missing or
        invalid file at once, even one it reported before. Like an event, it does
        not read a file a writer still holds open (written in place, not yet
        closed): it waits for that close, for at most ``close_wait_s``, so it
        blocks the caller that long at worst.
        """
        if self._state is None:
            raise RuntimeError("FileLayerWatcher.start() has not been called")
        if not self._wait_for_writers():
            return
        self._check(explicit=True)

    def _wait_for_writers(self) -> bool:
        """Wait until no watched file is held open by a writer, or ``close_wait_s`` has
        passed (a file then held is read as it stands, as the event path would by then).
        False if the watcher stopped meanwhile."""
        with self._cond:
            deadline = time.monotonic() + self._close_wait_s
            logged = False
            while not self._stopping:
                now = time.monotonic()
                until = self._writes_open_until(now)
                if until is None or now >= deadline:
                    break
                if not logged:
                    held = frozenset(self._open_since)
                    self._log.info(
                        "config_reload_waits_for_writer",
                        paths=[
                            str(path)
                            for path, where in zip(self._paths, self._where, strict=True)
                            if not held.isdisjoint(event_names([where]))
                        ],
                    )
                    logged = True
                self._cond.wait(min(until, deadline) - now)
            return not self._stopping

    def stop(self) -> None:
        """Stop watching; joins the observer's threads and the worker. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._folders.stop()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join()

    # --- the debounce --------------------------------------------------------------------------

    def _signal(self, complete: bool = False) -> None:
        """A folder event: (re)arm the trailing debounce, bounded by ``max_wait_s``.

        A rename onto a watched name (``complete``) is a finished atomic save: the
        check comes ``settle_s`` later, and the events that trail the same rename
        within that moment do not push it back.
        """
        with self._cond:
            now = time.monotonic()
            if complete:
                self._early_due = now + self._settle_s
                self._due = (
                    self._early_due if self._due is None else min(self._due, self._early_due)
                )
            elif self._early_due is None or now > self._early_due:
                if self._first_event is None:
                    self._first_event = now
                self._due = min(now + self._debounce_s, self._first_event + self._max_wait_s)
            self._cond.notify_all()

    def _written(self, name: str, closed: bool) -> None:
        """A file was written (``closed`` False) or closed after a write: if it is one of
        the watched files, checks keep its last contents until the close (see ``_run``)."""
        if name not in self._names:
            return
        with self._cond:
            if closed:
                self._open_since.pop(name, None)
                self._cond.notify_all()  # a reload may be waiting for this close
            else:
                self._open_since.setdefault(name, time.monotonic())

    def _writes_open_until(self, now: float) -> float | None:
        """None if every watched file may be read now; else, while one written in place is
        still open (its name stays in ``_open_since``), when to read it at the latest:
        ``close_wait_s`` after its first write (its close signals sooner). Called with
        ``_cond`` held."""
        if not self._await_close or not self._open_since:
            return None
        limit = self._close_wait_s
        self._open_since = {n: t for n, t in self._open_since.items() if now - t < limit}
        return min(self._open_since.values()) + limit if self._open_since else None

    def _recheck_at(self, when: float) -> None:
        with self._cond:
            if self._due is None or when < self._due:
                self._due = when
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._stopping and self._due is None:
                    self._cond.wait(_FOLDER_POLL_S)
                if self._stopping:
                    return
                due = self._due
                quiet = due is None
                if due is not None:
                    now = time.monotonic()
                    delay = due - now
                    if delay > 0:
                        self._cond.wait(delay)
                        continue
                    # A file a writer still holds keeps its last contents in this check, and
                    # is read at its close (which signals) or when its wait runs out (``_due``).
                    self._due = self._writes_open_until(now)
                    held = frozenset(self._open_since) if self._due is not None else frozenset()
                    self._first_event = None
                    self._early_due = None
            try:
                if quiet:
                    self._look_at_folders()
                else:
                    self._check(explicit=False, held=held)
            except Exception:
                self._log.exception("config_file_check_failed")

    # --- reading and comparing -----------------------------------------------------------------

    def _check(self, *, explicit: bool, held: frozenset[str] = frozenset()) -> None:
        with self._check_lock:
            self._file_stats = {where: _file_stat(where) for where in self._where}
            try:
                self._read_and_compare(explicit=explicit, held=held)
            finally:
                # A link swapped since may have given the files other names and folders.
                self._names = event_names(self._where)
                self._folders.follow()

    def _look_at_folders(self) -> None:
        """Check the files at once if a watched folder's path no longer names the folder
        watched, or the files are in other folders now: a rename, or a symlink swap, of a
        folder *above* them (a release folder's ``current`` link, a folder renamed away
        and made again) sends no event into the folders watched. Check them after the
        debounce if one was written without an event (see ``_written_unseen``)."""
        with self._check_lock:
            if self._folders.moved():
                self._signal(complete=True)
            elif self._written_unseen():
                self._signal()

    def _written_unseen(self) -> bool:
        """Whether a file's size or times changed since it was last read. A write through
        another name for the file (a file bind-mounted into a container and edited in place
        on the host, a hard link in another folder) sends no event into the folder watched:
        without this, the file would be read again only at some other event."""
        return any(_file_stat(where) != self._file_stats.get(where) for where in self._where)

    def _read_and_compare(self, *, explicit: bool, held: frozenset[str]) -> None:
        """Read every file and report the new state if it differs.

        A file that cannot be read keeps its last good contents, as one in ``held`` (names
        of files a writer still has open) does without being read: a change to another
        file is reported with them. A file that cannot be read is waited for first (see
        ``ReadGraces``; not by an explicit reload): while one is in its grace, nothing is
        reported but the problems of the files whose grace is over."""
        files: list[tuple[Path, Mapping[str, Any]]] = []
        read: list[Path] = []
        failed: dict[Path, Exception] = {}
        missing: list[Path] = []
        for path, where, last in zip(self._paths, self._where, self.state.files, strict=True):
            if held and not held.isdisjoint(event_names([where])):
                files.append(last)
                continue
            try:
                files.append((path, self._read_file(where)))
            except (LayerError, OSError) as exc:
                files.append(last)
                failed[path] = exc
                if not os.path.exists(where):
                    missing.append(path)
            else:
                read.append(path)
        awaited = self._graces.awaited(failed, missing, explicit)
        if awaited:  # mid-rename or mid-write: the files are read again when its grace ends
            for path, error in failed.items():
                if path not in awaited:
                    self._report(path, error, False)
            return
        # A file given twice (``--config a.yaml --config a.yaml``) is read twice: each of
        # its problems is still one, said and cleared once.
        recovered = [path for path in dict.fromkeys(read) if path in self._reported]
        for path in recovered:
            del self._reported[path]
        if recovered and not self._reported and not failed:  # every file reads again
            self._call(self._on_readable, "on_readable")
        new_state = FileLayerState(tuple(files))
        old_state = self.state
        changed = self._swap(new_state)
        if changed:
            paths = [
                str(path)
                for (path, new), (_, old) in zip(new_state.files, old_state.files, strict=True)
                if fingerprint(new) != fingerprint(old)
            ]
            self._log.info("config_files_changed", paths=paths)
            self._call(self._on_change, "on_change", new_state)
        # After a change, or a file read again, a listener may think every file reads: each
        # that does not (read now, or held and reported before) is told of again.
        again = explicit or changed or bool(recovered)
        for path in dict.fromkeys(self._paths):
            if path in failed:
                self._report(path, failed[path], again)
            elif path in self._reported:
                self._report(path, self._reported[path], again)

    def _call(self, callback: Callable[..., None] | None, name: str, *args: Any) -> None:
        """A callback's failure is logged; the watcher goes on."""
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            self._log.exception("config_file_callback_failed", callback=name)

    def _swap(self, state: FileLayerState) -> bool:
        seen = fingerprint([contents for _, contents in state.files])
        if self._state is not None and seen == self._fingerprint:
            return False
        self._state, self._fingerprint = state, seen
        return True

    def _report(self, path: Path, exc: Exception, again: bool) -> None:
        """Tell ``on_error`` once per distinct problem of a file (and the same one ``again``)."""
        reason = str(exc)
        before = self._reported.get(path)
        if not again and before is not None and str(before) == reason:
            return
        self._reported[path] = exc
        self._log.warning("config_file_invalid", path=str(path), reason=reason)
        self._call(self._on_error, "on_error", path, exc)
