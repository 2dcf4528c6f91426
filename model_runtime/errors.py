"""Errors raised by the in-process runtime.

::

    LiveConfigError (1)           base; ``exit_code`` matches hotknob's CLI codes
    +-- InvalidValue (1)          a live value a binding cannot use (checked before writing)
    +-- DaemonUnavailable (3)     no daemon answered on the socket in time (retryable)

Kept apart from ``hotknob.config.errors`` on purpose: importing that package
pulls pydantic, and ``import hotknob.model_runtime`` must stay cheap inside a
training process. The exit codes agree with the CLI's, so a launcher can map
either tree the same way.
"""

from __future__ import annotations


class LiveConfigError(Exception):
    """Base of the runtime's errors."""

    exit_code = 1


class InvalidValue(LiveConfigError):
    """A value a binding refuses (not a number, out of range); nothing was written."""


class DaemonUnavailable(LiveConfigError):
    """No hotknob daemon delivered a snapshot on the socket before the timeout.

    ``path`` is the socket that was tried; ``app`` the application name used to
    find it. Retrying later may succeed.
    """

    exit_code = 3

    def __init__(self, message: str, *, path: str = "", app: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.app = app
