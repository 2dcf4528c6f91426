"""A one-shot timer that any thread arms and an event loop waits on: Linux's timerfd.

The etcd watch thread pushes a lone change and leaves the rest of its work (its tail)
for a little later, once the clients have applied it (``daemon/held_tail.py``). Something has
to run that tail then. Sleeping on the watch thread holds back the next change that
etcd sends meanwhile; ``loop.call_soon_threadsafe`` would wake the event loop at once,
just as the clients apply the change on the same CPUs. A timerfd does neither:
arming it is one system call on the arming thread, and the loop's selector, which
watches its file descriptor, wakes only when it expires.

``Alarm.create()`` returns None where there is no timerfd (not Linux); the caller
then keeps to another way.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc_timerfd() -> tuple[int, Callable[[int, float], None]] | None:
    """A timerfd and its ``settime`` through the C library (Python before 3.13)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    settime.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(_Itimerspec),
        ctypes.POINTER(_Itimerspec),
    ]
    fd = create(time.CLOCK_MONOTONIC, 0)
    if fd < 0:
        return None

    def arm(fd: int, seconds: float) -> None:
        whole = int(seconds)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(whole, int((seconds - whole) * 1e9)))
        if settime(fd, 0, ctypes.byref(spec), None) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return fd, arm


def _os_timerfd() -> tuple[int, Callable[[int, float], None]] | None:
    """A timerfd through ``os`` (Python 3.13 and later, on Linux)."""
    create = getattr(os, "timerfd_create", None)
    settime = getattr(os, "timerfd_settime", None)
    if create is None or settime is None:
        return None
    return create(time.CLOCK_MONOTONIC), lambda fd, seconds: settime(fd, initial=seconds)


class Alarm:
    """``arm(seconds)`` from any thread; the descriptor (``fileno``) becomes readable
    when that time has passed; ``clear`` (on the thread that waits) makes it unreadable
    again. Arming again replaces the deadline. One-shot: it never fires twice for
    one ``arm``."""

    def __init__(self, fd: int, settime: Callable[[int, float], None]) -> None:
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        self._fd = fd
        self._settime = settime

    @classmethod
    def create(cls) -> Alarm | None:
        if not sys.platform.startswith("linux"):
            return None
        made = _os_timerfd() or _libc_timerfd()
        return cls(*made) if made is not None else None

    def fileno(self) -> int:
        return self._fd

    def arm(self, seconds: float) -> None:
        # A zero deadline disarms a timerfd: the shortest one that fires is 1 ns.
        self._settime(self._fd, max(seconds, 1e-9))

    def clear(self) -> None:
        """Take the expiry that made the descriptor readable (none: nothing happens)."""
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
