"""Making a socket path safe to listen on, before the server binds it.

The folder is created 0700 (or, if it exists, must belong to this user or root
and must not be writable by group or others unless sticky); one daemon at a time holds the
path (a lock file beside the socket); a stale socket file (nothing listening) is
removed; a live daemon's socket, and anything that is not a socket, is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

from hotknob.config.errors import HotknobError


class SocketPathError(HotknobError):
    """The socket path cannot be used: not a socket, an unsafe folder, or bind failed."""


class SocketInUse(SocketPathError):
    """A live daemon already listens on the socket path; it is never taken over."""


def prepare_folder(folder: Path) -> None:
    """Create ``folder`` 0700, or check that an existing one is safe. Raises ``SocketPathError``."""
    try:
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise SocketPathError(f"cannot create {folder}: {exc}") from exc
    try:
        st = os.stat(folder)
    except OSError as exc:  # a symlink to nothing, say
        raise SocketPathError(f"cannot use {folder} for the socket: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SocketPathError(f"{folder} is not a folder")
    if st.st_uid not in (os.getuid(), 0):
        raise SocketPathError(f"{folder} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise SocketPathError(
            f"{folder} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}, "
            "not sticky): another user could replace the socket"
        )


def lock_socket_path(path: Path) -> int | None:
    """Hold ``<path>.lock`` (an advisory lock, for the life of the returned descriptor):
    one daemon at a time prepares, binds and serves ``path``. Without it, a daemon between
    its bind and its listen refuses connections like a stale socket, and another one
    starting at that moment would remove its socket. Raises ``SocketInUse``.

    The lock file stays when the daemon stops (removing it would race with the next one)
    and is readable by all (``0644``): a lock needs only a read descriptor, so in a folder
    users share (sticky, like ``/tmp``) another user's daemon can take it later. None if
    the file cannot be opened at all (a stranger's, unreadable): then the path is served
    unlocked, as the socket's own checks still guard it.
    """
    lock_path = path.with_name(path.name + ".lock")
    fd = None
    while fd is None:
        try:
            # Not blocking: a FIFO in the lock file's place would hold the start forever.
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            try:  # created here, then opened as above (by whichever daemon made it)
                os.close(os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                pass
            except OSError as exc:
                raise SocketPathError(f"cannot create {lock_path}: {exc.strerror or exc}") from exc
        except PermissionError:
            return None
        except OSError as exc:
            raise SocketPathError(f"cannot open {lock_path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SocketInUse(f"{path} is in use (another daemon holds {lock_path})") from None
    return fd


def clear_stale_socket(path: Path) -> bool:
    """Remove a socket file nobody listens on; True if one was removed.

    Raises ``SocketInUse`` if a daemon listens there, ``SocketPathError`` if the
    path is something other than a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        code = probe.connect_ex(str(path))
    finally:
        probe.close()
    if code == errno.ENOENT:
        return False
    if code in (errno.EACCES, errno.EPERM):  # another user's: not ours to remove either
        raise SocketPathError(
            f"{path} is another user's socket (cannot connect: {os.strerror(code)}); "
            "not taking it over"
        )
    if code != errno.ECONNREFUSED:
        detail = "a daemon is listening" if code in (0, errno.EAGAIN) else os.strerror(code)
        raise SocketInUse(f"{path} is in use ({detail}); not taking it over")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True
