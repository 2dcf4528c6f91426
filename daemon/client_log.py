"""What a socket client can make the daemon log, bounded.

A client decides how many lines it causes and how large: one that reconnects in a loop
sending junk brings a ``client_error`` per connection, and a ``hello`` may carry a MiB of
extra fields, each of which ``client_connected`` logs. The server (``socket_server``)
says what happened; this keeps what that costs the log within limits, apart from the
protocol, which it knows nothing of: ``ClientErrors`` logs at most ``CLIENT_ERRORS_LOGGED``
``client_error`` lines every ``CLIENT_ERROR_LOG_EVERY_S`` and counts the rest (in one
``client_errors_not_logged`` line), and ``logged_extra`` cuts a ``hello``'s extra fields
to what is worth a log line.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

from .table import cut
from .throttle import LogLimit

CLIENT_ERROR_LOG_EVERY_S = 10.0
CLIENT_ERRORS_LOGGED = 20
"""At most this many ``client_error`` lines a client caused every ``CLIENT_ERROR_LOG_EVERY_S``:
enough to see each of a few misbehaving clients, not a line per connection of one in a loop."""
LOGGED_EXTRA_FIELDS = 16
LOGGED_EXTRA_CHARS = 200


class ClientErrors:
    """The ``client_error`` lines of every client of one server, under one limit. Loop
    thread only (``LogLimit``); ``flush`` at the close."""

    def __init__(self, log: Any):
        self._log = log
        self._lines = LogLimit(CLIENT_ERROR_LOG_EVERY_S, CLIENT_ERRORS_LOGGED, self._not_logged)
        self._last_unlogged = ""

    def report(self, conn_log: Any, *, error: str, **fields: Any) -> None:
        """Log ``client_error`` to ``conn_log`` (the connection's logger), within
        ``CLIENT_ERRORS_LOGGED`` every ``CLIENT_ERROR_LOG_EVERY_S``; past it, the line is
        counted (``LogLimit``)."""
        if self._lines.allow():
            conn_log.warning("client_error", error=error, **fields)
        else:
            self._last_unlogged = error

    def flush(self) -> None:
        """Say now how many lines were not logged since the last summary, if any."""
        self._lines.flush()

    def _not_logged(self, count: int) -> None:
        self._log.warning(
            "client_errors_not_logged",
            count=count,
            last_error=cut(self._last_unlogged, LOGGED_EXTRA_CHARS),
            detail=f"clients caused more than {CLIENT_ERRORS_LOGGED} client_error lines in "
            f"{CLIENT_ERROR_LOG_EVERY_S:g} s: look for a process that reconnects in a loop "
            "(the logged lines name its peer_pid)",
        )


def logged_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """A ``hello``'s extra fields as ``client_connected`` logs them: each as
    ``extra_<name>``, so that none takes the place of what the daemon logs itself (the
    kernel's ``uid`` and ``peer_pid``, ``client_id``, ``event``) or of the logger's own
    arguments, and one named like a credential is still masked by its name. A client may
    send a MiB of them: the first ``LOGGED_EXTRA_FIELDS`` are logged, a value longer than
    ``LOGGED_EXTRA_CHARS`` (as JSON) cut to that, and ``extra_fields_not_logged`` counts
    the rest."""
    logged: dict[str, Any] = {}
    for name, value in itertools.islice(extra.items(), LOGGED_EXTRA_FIELDS):
        shown: Any = value
        if isinstance(value, str):
            shown = cut(value, LOGGED_EXTRA_CHARS)
        else:
            try:
                text = json.dumps(value)
            except RecursionError:
                text = "(not shown: nested too deeply)"
            if len(text) > LOGGED_EXTRA_CHARS:
                shown = cut(text, LOGGED_EXTRA_CHARS)
        logged[f"extra_{cut(name, 64)}"] = shown
    if len(extra) > LOGGED_EXTRA_FIELDS:
        logged["extra_fields_not_logged"] = len(extra) - LOGGED_EXTRA_FIELDS
    return logged
