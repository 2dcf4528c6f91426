"""Where an app's daemon listens: the app names it may have, and the socket's path.

A process and its daemon find each other without talking first: both derive the socket
from the app's name (``default_socket_path``) unless ``--socket``/``HOTKNOB_SOCKET`` names
it, and each refuses beforehand what neither could use: an app name that is no safe path
segment (``APP_NAME``, ``APP_NAME_RULE``), a path longer than a Unix socket's may be
(``socket_path_problem``).

Apart from ``protocol`` because none of it is in a message: ``protocol`` defines what
travels on the socket, this module where the socket is. Stdlib only, for both ends like
``protocol``, which re-exports these names (the daemon imports nothing else of the
runtime).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

# An app name is a path segment of the etcd keys (/hotknob/<app>/...), the name of the
# default socket and of the state file: nothing that leaves its folder (``/``, ``..``),
# nothing empty or hidden, nothing a shell or a URL would need quoted.
APP_NAME_MAX = 100
APP_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{APP_NAME_MAX - 1}}}")
APP_NAME_RULE = (
    f"an app name is 1 to {APP_NAME_MAX} letters, digits, '.', '_' or '-', starting with a "
    "letter or digit"
)
SOCKET_PATH_MAX = 107
"""The longest path a Unix socket may have on Linux, in bytes (``sun_path`` holds 108,
with the closing NUL)."""


def socket_path_problem(path: str) -> str | None:
    """Why no Unix socket can be at ``path`` (too long to bind or connect to), or None."""
    size = len(os.fsencode(path))
    if size <= SOCKET_PATH_MAX:
        return None
    return (
        f"the socket path {path} is {size} bytes, longer than a Unix socket's path may be "
        f"({SOCKET_PATH_MAX}): use a shorter --socket / HOTKNOB_SOCKET or app name"
    )


def default_socket_path(app: str, env: Mapping[str, str] | None = None) -> Path:
    """Where the daemon of ``app`` listens unless ``--socket``/``HOTKNOB_SOCKET`` says otherwise.

    ``$XDG_RUNTIME_DIR/hotknob/<app>.sock``, else ``/tmp/hotknob-<uid>/<app>.sock``.
    """
    env = os.environ if env is None else env
    explicit = env.get("HOTKNOB_SOCKET")
    if explicit:
        return Path(explicit)
    runtime_dir = env.get("XDG_RUNTIME_DIR")
    folder = Path(runtime_dir) / "hotknob" if runtime_dir else Path(f"/tmp/hotknob-{os.getuid()}")
    return folder / f"{app}.sock"
