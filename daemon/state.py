"""The last-known-good state and the version reservation, kept in one file off the push path.

The file survives a daemon restart so that versions keep increasing and a
daemon started while etcd is down can serve the values it last accepted.

Versions are reserved in blocks so that no change waits for a disk: the file
records a ``version_ceiling``, and the daemon never publishes a version above the
ceiling that is on disk. Raising the ceiling (``save``, with fsync) happens once
per ``VERSION_BLOCK`` versions. The snapshot itself is written by ``StateWriter``
(``state_writer.py``) on a thread of its own, coalesced to the newest state. A daemon
that starts after a crash (even a SIGKILL right after a push, before any snapshot was
saved) begins above the ceiling, so it never reissues a version a client may have
seen. Only a clean stop writes ``clean: true``, with the final state, synchronously:
that daemon published nothing after it, so a restart on the same values keeps its
version.

A write is all-or-nothing (temp file, fsync, rename); writes are serialised, a
snapshot older than the one on disk is never written over it, and the ceiling on
disk never goes down. A write that raises the ceiling, or that says ``clean``, also
fsyncs the folder after the rename, so a power loss cannot bring back a file with
a lower ceiling; the per-change snapshots in between skip that (losing one brings
back a file with the same ceiling, which is safe). A failed write is reported to
the caller (``save``) or to ``on_result`` (the writer) and never takes the
daemon down.

One daemon at a time uses a state file: it holds ``<app>.state.lock`` beside it
(``StateStore.lock``) for its whole life. Two daemons on one file would each write
their own ceiling over the other's, and versions would go backwards. On a state dir
it cannot write and that has no lock file (a read-only volume), it holds the state
file itself instead; with neither file there is nothing to lock, and it goes on
unlocked.

A file that is there but cannot be read as this format (``state_format.py``:
truncated, corrupt, written by another format, not a regular file, a count above the
protocol's 2^63 - 1) is moved aside to ``<name>.unreadable-<UTC time>`` by ``load``,
never overwritten, and counts as no file: versions restart at 1.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hotknob.config.errors import HotknobError

from .state_format import SavedState, Unreadable, decode, encode

VERSION_BLOCK = 1000


class StateInUse(HotknobError):
    """Another daemon holds the state file's lock: it serves the same app from the same
    state dir (another ``--socket``), and the two would undo each other's versions."""

    exit_code = 1


@dataclass(frozen=True)
class SetAside:
    """A state file ``load`` could not read: why, and where it went (``moved_to`` None,
    with ``move_error``, if it could not be moved)."""

    path: Path
    reason: str
    moved_to: Path | None
    move_error: str | None = None


class StateStore:
    """``<state-dir>/<app>.state.json``; ``save`` may be called from several threads."""

    def __init__(self, state_dir: Path, app: str):
        self.path = Path(state_dir) / f"{app}.state.json"
        self.lock_path = Path(state_dir) / f"{app}.state.lock"
        self.set_aside: SetAside | None = None  # what the last ``load`` moved aside
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._state_fd: int | None = None  # the state file's own lock (``_lock_state_file``)
        self._written_version = -1
        self._ceiling = 0

    def lock(self, holder: str = "") -> str | None:
        """Hold ``<app>.state.lock`` until ``unlock``; raises ``StateInUse`` if another
        daemon holds it. ``holder`` (who this is: pid, socket) is written into the lock
        file, so that a daemon refused names who holds it.

        A state dir this daemon cannot write, with no lock file in it (a read-only volume
        the lock file was never created on): the state file itself is locked, opened
        read-only, and held across this daemon's own writes of it (``_write``); a daemon
        that holds the lock file is refused too while another holds the state file.

        None when locked; else why the lock could not be taken at all (the folder cannot
        be created or written, and holds neither file): the daemon goes on unlocked then,
        as it does when it cannot save, rather than not serving.
        """
        if self._lock_fd is not None or self._state_fd is not None:
            return None
        try:
            _make_folder(self.path.parent)
            # 0644: another user's daemon on a shared state dir must be able to open it
            # and be refused, not go on unlocked and lower the version ceiling.
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                return f"{self.lock_path}: {exc.strerror or exc}"
            try:  # not ours to write, or a read-only volume: flock works read-only too
                fd = os.open(self.lock_path, _READ_ONLY)
            except OSError as again:
                if again.errno != errno.ENOENT:
                    return f"{self.lock_path}: {again.strerror or again}"
                return self._lock_state_file(f"{self.lock_path}: {again.strerror or again}")
        problem = self._lock_lock_file(fd)
        if problem is not None:
            return problem
        if _held_elsewhere(self.path):
            # A daemon that found no lock file and could not create one holds the state
            # file itself (``_lock_state_file``).
            self.unlock()
            raise StateInUse(f"{self.path} is in use (another daemon holds a lock on it)")
        if holder:
            with contextlib.suppress(OSError):  # only a name for a refused daemon's message
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode("utf-8", "replace") + b"\n", 0)
        return None

    def _lock_lock_file(self, fd: int) -> str | None:
        """Take the lock file's lock on ``fd`` (or close it and raise ``StateInUse``)."""
        failed = _flock_or_close(fd)
        if failed is not None:
            if failed.errno not in _HELD:
                return f"{self.lock_path}: {failed.strerror or failed}"
            held_by = _read_holder(self.lock_path)
            raise StateInUse(
                f"{self.path} is in use (another daemon holds {self.lock_path}"
                + (f": {held_by})" if held_by else ")")
            )
        self._lock_fd = fd
        return None

    def _lock_state_file(self, no_lock_file: str) -> str | None:
        """No lock file, and none can be created: lock the state file itself, read-only.
        None when locked; else why not (there is no state file either: nothing to lock)."""
        try:
            fd = os.open(self.path, _READ_ONLY)
        except OSError as exc:
            return f"{no_lock_file}; {self.path}: {exc.strerror or exc}"
        failed = _flock_or_close(fd)
        if failed is not None:
            if failed.errno not in _HELD:
                return f"{no_lock_file}; {self.path}: {failed.strerror or failed}"
            raise StateInUse(f"{self.path} is in use (another daemon holds a lock on it)")
        self._state_fd = fd
        # A daemon that can write the folder may have created the lock file meanwhile and
        # locked it before this lock was taken (it looks at the state file after its own
        # lock): take the lock file's too, or be refused by it.
        try:
            lock_fd = os.open(self.lock_path, _READ_ONLY)
        except OSError:
            return None
        try:
            self._lock_lock_file(lock_fd)
        except StateInUse:
            self.unlock()
            raise
        return None

    def unlock(self) -> None:
        """Let the lock go (the lock file stays: removing it would race with the next
        daemon)."""
        with self._lock:
            fds = (self._lock_fd, self._state_fd)
            self._lock_fd = self._state_fd = None
        for fd in fds:
            if fd is not None:
                os.close(fd)

    @property
    def ceiling(self) -> int:
        """The highest version ceiling this store has put on disk (0 before the first)."""
        return self._ceiling

    def load(self) -> SavedState | None:
        """The saved state, or None if there is none (never raises).

        A file that is there but cannot be read as this format is moved aside (to
        ``<name>.unreadable-<UTC time>``, so that neither it is lost nor a save writes
        over it) and counts as none; ``set_aside`` then says what happened, for the
        caller to report. A file written before versions were reserved (no
        ``version_ceiling``) was saved before every push, so its version is the highest
        published: it counts as clean.
        """
        self.set_aside = None
        try:
            text = _read_regular(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self._set_aside(f"cannot read it: {exc.strerror or exc}")
            return None
        try:
            return decode(text)
        except Unreadable as exc:
            self._set_aside(str(exc))
            return None

    def _set_aside(self, reason: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.unreadable-{stamp}")
        n = 1
        while os.path.lexists(target):  # no other daemon renames here: it holds the lock
            target = self.path.with_name(f"{self.path.name}.unreadable-{stamp}-{n}")
            n += 1
        try:
            os.rename(self.path, target)
            _fsync_folder(self.path.parent)
        except OSError as exc:
            self.set_aside = SetAside(self.path, reason, None, exc.strerror or str(exc))
        else:
            self.set_aside = SetAside(self.path, reason, target)

    def save(self, state: SavedState) -> bool:
        """Write ``state`` atomically; False if a newer snapshot is already on disk.

        The ceiling written is the highest ever given to this store. Raises OSError if
        the folder is not writable or full.
        """
        with self._lock:
            if state.version < self._written_version:
                return False
            ceiling = max(self._ceiling, state.version_ceiling)
            text = encode(state, ceiling, time.time())
            # The folder too where a power loss must not bring back the file before:
            # a new ceiling (a lower one would come back), a clean stop.
            durable = ceiling > self._ceiling or state.clean
            self._write(text, durable)
            self._written_version = state.version
            self._ceiling = ceiling
            return True

    def _write(self, text: str, durable: bool) -> None:
        _make_folder(self.path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        held: int | None = None
        try:
            if self._state_fd is not None:
                # The lock is on the state file itself: lock the new file before it takes
                # the name, so that the name never points at a file no one holds.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = os.dup(fd)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if held is not None:
                os.close(held)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if held is not None:
            old, self._state_fd = self._state_fd, held
            if old is not None:
                os.close(old)  # the file before, renamed over
        if durable:
            _fsync_folder(self.path.parent)


def _make_folder(folder: Path) -> None:
    """Create the state dir if missing. Something else by its name (a file) is said as
    ENOTDIR, as it is when a folder above it is a file: "File exists" named a state file
    or a lock file that does not exist."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)) from None


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power loss, where the file system can: one
    that refuses to sync a folder (EINVAL, ENOTSUP) has the rename done all the same,
    and failing the save for it would send every change through a synchronous save."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


_READ_ONLY = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
"""How the state and lock files are opened to read or lock: a FIFO put in their place
would block a plain open until some writer came, and the daemon with it, SIGTERM too."""


def _read_regular(path: Path) -> bytes:
    """The contents of the file at ``path``; OSError if it is not a regular file."""
    fd = os.open(path, _READ_ONLY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed with ``f``
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
"""What ``flock`` without waiting fails with when another holds the lock."""


def _flock_or_close(fd: int) -> OSError | None:
    """Lock ``fd`` at once (exclusive); None if locked, else why not, ``fd`` closed."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        return exc
    return None


def _held_elsewhere(path: Path) -> bool:
    """Whether another daemon holds ``path`` locked (False if it cannot be opened)."""
    try:
        fd = os.open(path, _READ_ONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in _HELD
    finally:
        os.close(fd)  # and with it the lock, if taken
    return False


def _read_holder(lock_path: Path) -> str:
    """What the daemon holding ``lock_path`` wrote into it (``pid …, socket …``), or ""."""
    try:
        with open(lock_path, "rb") as f:
            return f.read(512).decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, IndexError):
        return ""
