"""What a ``LiveConfig`` does with each message, on the connection's background thread.

``DaemonConnection`` hands every ``snapshot`` and ``update`` to ``_on_message``: a
snapshot (the answer to each ``hello``, so one per connection and reconnect) says which
app the daemon serves (a daemon of another app is refused, ``_refuse_app``) and which keys
are restart-only or secret; every message becomes a ``received.State``, held at the
restart-only values the process runs, and kept as pending unless it is what is applied
already (``_receive``, which acknowledges the values in force again to a new
connection's daemon). Bound as methods of ``client.LiveConfig`` under the same names.

Apart from ``client.LiveConfig`` because it is the one part that runs on the background
thread: it never touches a binding or a callback, and shares with the training thread
only the client's one lock (``_lock``) and the states it guards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import protocol
from .acks import ackable
from .received import NOTHING, State, same_values, state_from_message
from .restart_only import held_fields

if TYPE_CHECKING:
    from .client import LiveConfig

log = logging.getLogger("hotknob.model_runtime")


def _on_message(live: LiveConfig, message: Mapping[str, Any], is_snapshot: bool) -> None:
    if is_snapshot:
        served = message.get("app")
        if live._app is not None and isinstance(served, str) and served != live._app:
            live._refuse_app(served)
            return
        live._wrong_app = None
    elif live._wrong_app is not None:
        return  # an update of the daemon refused at its snapshot
    if is_snapshot:
        live._restart_only.keys = protocol.restart_only_keys(message)
        secret = live._restart_only.secret = protocol.secret_keys(message)
        live._hooks.secret = secret  # a failure's text masks their values
    # A rank keeps the last states for the ranks' agreement: each shares with the one
    # before all that did not change. Alone, it keeps one, and builds each anew.
    received = live._received
    like = received[-1] if received.maxlen != 1 and received else None
    state = state_from_message(message, like)
    applied = live._applied
    if live._restart_only.keys:
        state = live._restart_only.hold(state, applied)
    live._receive(state, is_snapshot, held_at=applied)


def _refuse_app(live: LiveConfig, served: str) -> None:
    """The daemon at the socket serves another app than the one asked for (a
    ``HOTKNOB_SOCKET`` left from another job): none of its values may reach this
    process. ``connect`` raises at once; after it, the values in force stay and the
    connection's states are dropped until a daemon of the app asked for answers."""
    said = live._wrong_app is not None
    live._wrong_app = (
        f"the hotknob daemon at {live._path} serves app {served!r}, not {live._app!r}: "
        "check socket= (or HOTKNOB_SOCKET) and app= (or HOTKNOB_APP)"
    )
    if not live._first_state.is_set():
        live._first_state.set()  # ``connect`` says why, without waiting for its timeout
    elif not said:
        log.error("live_wrong_app %s; the values in force stay", live._wrong_app)


def _receive(live: LiveConfig, state: State, is_snapshot: bool, held_at: State = NOTHING) -> None:
    """Keep ``state`` as pending unless it is exactly what is already applied, or the
    daemon's state a loaded checkpoint replaced, sent again: its values at its etcd
    revision, under any version (a daemon restarted after a crash numbers its state
    anew, above the one it had). ``held_at``: the applied state ``state`` was held at
    (``RestartOnlyHold.hold``)."""
    with live._lock:
        if is_snapshot:  # a new connection: its daemon was told nothing yet
            live._agreed_told = None
        if held_at is NOTHING and live._applied is not NOTHING and live._restart_only.keys:
            # The first apply came in between: it held those received before it
            # (``_hold_received``), and this one is held here.
            state = live._restart_only.hold(state, live._applied)
        live._received.append(state)
        applied = live._applied
        superseded = live._superseded
        if (
            superseded is not None
            and same_values(state.flat, superseded.flat)
            and state.revision == superseded.revision
        ):
            up_to_date = True  # sent again: the loaded checkpoint stays in force
        else:
            live._superseded = None  # a new edit: from now on, the daemon's state wins
            live._latest = state
            up_to_date = state.same_as(applied)
            live._pending = None if up_to_date else state
        step, at = live._applied_step, live._applied_at
    # A step no ack can carry (``apply(5.5)``: logged at that apply) is not sent: the
    # daemon would close the connection, and each reconnect would send it again.
    if up_to_date and is_snapshot and ackable(step):
        held = held_fields(state)
        # ``at``: the values were applied then, not at this reconnect (``status``'s age).
        live._conn.send(protocol.applied(applied.version, step, at=at, **held))
    if not live._first_state.is_set():  # ``set`` takes a lock and notifies: once is enough
        live._first_state.set()
