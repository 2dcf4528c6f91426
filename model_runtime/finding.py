"""Finding the daemon, for ``LiveConfig.connect``: which socket, under which client name,
and why no state came.

Before ``connect`` waits, it settles the socket path (``socket=``, else the default path
of the app) and checks what no daemon could be reached at or would take: an invalid app
name, a path too long for a Unix socket, a hello the daemon would refuse or that could
not be sent at all (``where_to_connect``). Those fail at once, not after the timeout.
After a wait that brought no state, ``no_state`` says why, and how to start a daemon
where the process looks for one.

Apart from ``client.LiveConfig`` because none of it runs once the process is connected:
it is the first call's checks and messages, beside the client's steady state.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from . import protocol
from .errors import DaemonUnavailable

DAEMON_SAID = "daemon: "
"""How ``DaemonConnection.last_error`` begins an ``error`` line the daemon sent."""


def default_client_name() -> str:
    import socket

    name = f"{socket.gethostname()}-{os.getpid()}"
    dist = sys.modules.get("torch.distributed")  # only if the process already imported it
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                name += f"-rank{dist.get_rank()}"
        except Exception:  # a half-initialised group must not stop the connect
            pass
    return name


def where_to_connect(
    socket: str | os.PathLike[str] | None,
    app_name: str,
    client: str,
    hello_extra: Mapping[str, Any],
) -> tuple[str, str | None]:
    """The socket path (``socket``, else ``app_name``'s default path), and why ``connect``
    cannot use it or its hello (None if it can)."""
    if socket is not None:
        path = os.fspath(socket)
    elif not protocol.APP_NAME.fullmatch(app_name):
        problem = f"invalid app name {app_name[:60]!r} (app= or HOTKNOB_APP): "
        return "", problem + protocol.APP_NAME_RULE
    else:
        path = str(protocol.default_socket_path(app_name))
    return path, protocol.socket_path_problem(path) or _hello_problem(client, hello_extra)


def _hello_problem(client: str, extra: Mapping[str, Any]) -> str | None:
    """Why the daemon would refuse this ``hello`` (or it could not be sent at all), or None:
    else each reconnect would be refused, and ``connect`` would wait out its timeout."""
    try:
        message = protocol.hello(client, **extra)
        protocol.validate_client_message(message, said_hello=False)
        protocol.encode(message)
    except protocol.ProtocolError as exc:
        return f"the hello (client= and the extra keyword arguments) is refused: {exc}"
    return None


def absolute(path: str) -> str:
    """``path`` made absolute where that still fits a Unix socket: a relative one would be
    found anew from the working directory at each reconnect, which the process may change."""
    absolute = os.path.abspath(path)
    return path if protocol.socket_path_problem(absolute) else absolute


def no_state(
    path: str,
    app_name: str,
    timeout: float,
    *,
    given: bool,
    reason: str,
    silent: list[int],
    got_state: bool,
) -> DaemonUnavailable:
    """Why ``connect`` got no state from the daemon at ``path`` within ``timeout``, to raise:
    ``got_state``, this rank got one (another rank's daemon did not answer); ``silent``,
    the ranks that got none, under a group; ``reason``, the connection's last error;
    ``given``, the socket was passed, or ``HOTKNOB_SOCKET`` named it."""
    if got_state:  # this rank's daemon answered; another rank's did not
        return DaemonUnavailable(
            f"rank(s) {', '.join(map(str, silent))} got no snapshot from their "
            f"hotknob daemon within {timeout:g} s (this rank's, at {path}, "
            "answered): start one on their nodes, or check the socket they are given",
            path=path,
            app=app_name,
        )
    ranks = ", ".join(map(str, silent))
    if reason.startswith(DAEMON_SAID):
        # A daemon is there and answered with an error (it cannot send its state,
        # or refused this client): starting one, as below, would not help.
        return DaemonUnavailable(
            f"the hotknob daemon at {path} sent no state within {timeout:g} s; it "
            f"said: {reason[len(DAEMON_SAID) :]}"
            + (f" (ranks without a state: {ranks})" if ranks else ""),
            path=path,
            app=app_name,
        )
    if not given:
        how = f"`hotknob run --app {app_name}`, or pass socket= / set HOTKNOB_SOCKET"
    else:  # the socket it was given, or the variable named: a daemon started there
        how = f"`hotknob run --app {app_name} --socket {path}`"
    return DaemonUnavailable(
        f"no hotknob daemon at {path} after {timeout:g} s: start one with {how}"
        + (f" (last error: {reason})" if reason else "")
        + (f" (ranks without one: {ranks})" if ranks else ""),
        path=path,
        app=app_name,
    )
