"""Making a socket path safe to listen on, before the server binds it.

The folder is created 0700 (or, if it exists, must belong to this user or root
and must not be writable by others unless sticky); a stale socket file (nothing
listening) is removed; a live daemon's socket, and anything that is not a
socket, is never touched.
"""

from __future__ import annotations

import contextlib
import errno
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
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise SocketPathError(f"{folder} is not a folder")
    if st.st_uid not in (os.getuid(), 0):
        raise SocketPathError(f"{folder} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise SocketPathError(f"{folder} is writable by others: anyone could replace the socket")


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
    if code != errno.ECONNREFUSED:
        detail = "a daemon is listening" if code in (0, errno.EAGAIN) else os.strerror(code)
        raise SocketInUse(f"{path} is in use ({detail}); not taking it over")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True
