"""Connecting a ``LiveConfig``: ``connect``, and its wait for the daemon's first state.

``connect`` finds the socket and checks the hello before anything waits (``finding``),
builds the client (under a group, with its ``distributed.StepSync``, and on every rank),
and waits, in ``_start``, until the first state arrives and is applied, or says why none
came. Bound as ``client.LiveConfig.connect`` (a classmethod) and ``LiveConfig._start``.

Apart from ``client.LiveConfig`` because it runs once, before the client is in use: what
the training thread does afterwards (``apply``) and what the background thread does with
each message (``receiving``) never come back here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .finding import absolute, default_client_name, no_state, where_to_connect

if TYPE_CHECKING:
    from .client import LiveConfig


def connect(
    cls: type[LiveConfig],
    socket: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
    *,
    app: str | None = None,
    client: str | None = None,
    distributed: bool = False,
    process_group: Any = None,
    sync_every: int | None = None,
    **hello_extra: Any,
) -> LiveConfig:
    """Connect to the daemon and apply its first snapshot before returning.

    The socket is ``socket``, else ``$HOTKNOB_SOCKET``, else the default path
    of ``app`` (else ``$HOTKNOB_APP``, else ``default``). ``client`` names
    this process in the daemon's status (default ``HOST-PID``, plus
    ``-rankN`` when torch.distributed is already initialised). Extra keyword
    arguments travel in the ``hello`` message.

    ``distributed=True`` (the default group) or ``process_group=pg`` makes
    every rank of the initialised group apply the same values at the same
    ``apply`` call, agreed every ``sync_every`` calls (default
    ``distributed.DEFAULT_SYNC_EVERY``). Then ``connect`` is a collective:
    every rank of the group calls it, and ``rank``/``world_size`` travel in
    the hello; the client name always ends in ``-rankN``.

    Raises ``DaemonUnavailable`` if no snapshot arrives within ``timeout``
    seconds (under a group: on every rank, if any rank got none), and
    ``ValueError`` for a distributed request without an initialised group, an
    invalid app name, a socket path too long for a Unix socket, or a hello the
    daemon would refuse (``client``, or an extra argument: not JSON, too large)
    (at once, on every rank of a group). A relative socket path is made absolute
    here, where it still fits: reconnects then find it whatever the working
    directory. Interrupted (Ctrl-C), it leaves no client behind.
    """
    sync = None
    name = client or default_client_name()
    if distributed or process_group is not None:
        from .distributed import StepSync

        sync = StepSync(process_group, sync_every)
        sync.check_same_settings()
        name = sync.client_name(name)
        hello_extra = {**sync.hello_fields(), **hello_extra}
    elif sync_every is not None:
        raise ValueError("sync_every needs distributed=True or a process_group")
    app_name = app or os.environ.get("HOTKNOB_APP") or "default"
    path, problem = where_to_connect(socket, app_name, name, hello_extra)
    # At once, not after ``timeout`` (no daemon could be reached there, or would take
    # this hello); under a group on every rank (``connect`` is a collective: no rank is
    # left waiting in one).
    if sync is not None and not sync.all_true(problem is None):
        raise ValueError(problem or "another rank has no usable socket path or hello")
    if problem is not None:
        raise ValueError(problem)
    path = absolute(path)
    live = cls(path, name, hello_extra, sync, app=app or os.environ.get("HOTKNOB_APP"))
    try:
        given = socket is not None or bool(os.environ.get("HOTKNOB_SOCKET"))
        live._start(timeout, app_name, given=given)
    except BaseException:  # an interrupted wait must not leave a client connecting
        live.close()
        raise
    return live


def _start(live: LiveConfig, timeout: float, app_name: str, *, given: bool) -> None:
    """``connect``'s wait for the first state (``given``: the socket was passed, or
    ``HOTKNOB_SOCKET`` named it)."""
    sync, path = live._sync, live._path
    live._conn.start()
    got_state = live._first_state.wait(timeout) and live._wrong_app is None
    everyone = got_state if sync is None else sync.all_true(got_state)
    if not everyone:
        # Under a group every rank is here: which ranks got nothing is one more
        # collective, so that each names them.
        silent = sync.ranks_without(got_state) if sync is not None else []
        reason = live._conn.last_error
        wrong_app = live._wrong_app
        live.close()
        if wrong_app is not None:  # at once: waiting would not make it another app's
            raise ValueError(wrong_app)
        raise no_state(
            path,
            app_name,
            timeout,
            given=given,
            reason=reason,
            silent=silent,
            got_state=got_state,
        )
    if sync is None:
        live._apply_pending(0)
    else:
        sync.agree(live, 0)
