"""What a rank's ``LiveConfig`` does when the ranks agree on values (``distributed.StepSync``).

Under a process group, ``StepSync.agree`` picks the state every rank applies and calls
these, bound as methods of ``client.LiveConfig`` under the same names: installing the
agreed state, pending or not, maybe another rank's (``_apply_state``), holding the states
received before at the restart-only values of the first one applied (``_hold_received``),
acknowledging another rank's values once this rank's daemon sends them (``_adopt``,
``_renumbered``) or telling its daemon that it runs them in place of its newest state
(``_tell_agreed``), taking back the daemon's state a loaded checkpoint replaced
(``_take_back_superseded``), and reading the history of states received
(``_received_states``).

Apart from ``client.LiveConfig`` because a single process never runs them: they are the
client's side of the ranks' agreement, read beside ``distributed``. They keep the
client's one lock (``_lock``) and its one state (applied, pending, newest, received) as
the rest of the client does; each takes the client as its first argument.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from . import protocol
from .acks import ackable
from .received import NOTHING
from .restart_only import held_fields

if TYPE_CHECKING:
    from .client import LiveConfig
    from .received import State


def _apply_state(live: LiveConfig, new: State, step: int, *, ack: bool) -> None:
    """Apply ``new`` (chosen by the ranks' agreement), pending or not.

    The pending state is cleared if it holds the same values. ``ack`` is False
    for values that came from another rank, whose version is another daemon's; they
    are acknowledged when this rank's daemon sends the same values (``_adopt``).
    Called by ``StepSync.agree``, inside its ``_begin_apply``.
    """
    with live._lock:
        pending = live._pending
        if pending is not None and pending.digest == new.digest:
            live._pending = None
        old, live._applied = live._applied, new
        live._applied_step, live._applied_at = step, time.time()
        live._unacked = not ack
        if old is NOTHING and live._restart_only.keys:
            live._hold_received()
    live._after_apply(old, new, step, ack=ack)


def _hold_received(live: LiveConfig) -> None:
    """Hold the states received so far (``RestartOnlyHold.hold``) at the restart-only
    values of the first state applied, under ``_lock``. They came before anything was
    applied, so they are as the daemon sent them; under a group the first state applied
    may be another rank's, whose daemon holds other restart-only values (it started
    before a restart-only ``set``, this one after). Unheld, this rank's newest would
    never show the values it runs, so it would never acknowledge them, and, chosen at a
    later agreement, it would change a restart-only key on every rank."""
    applied = live._applied
    held = {id(state): live._restart_only.hold(state, applied) for state in live._received}
    live._received = deque(held.values(), maxlen=live._received.maxlen)
    latest, pending = live._latest, live._pending
    if latest is not None:
        live._latest = held.get(id(latest), latest)
    if pending is not None:
        live._pending = held.get(id(pending), pending)


def _adopt(live: LiveConfig, state: State) -> bool:
    """If the applied values came from another rank unacknowledged and ``state``, sent
    by this rank's daemon, holds the same values: make ``state`` the applied one (its
    version is this daemon's) and acknowledge it (``_renumbered``). True if it did."""
    with live._lock:
        if not live._unacked or state.digest != live._applied.digest:
            return False
    live._renumbered(state, ack=True)
    return True


def _renumbered(live: LiveConfig, state: State, *, ack: bool) -> None:
    """Make ``state``, which holds the applied values under another version or revision
    (this rank's daemon's own, or the one it renumbered them with at a restart), the
    applied one; ``ack`` it at the step those values were applied, as a single process
    does (``_receive``): ``status``, checkpoints and guards place the change there.
    Nothing runs: no value changes. Called by ``StepSync.agree``."""
    with live._lock:
        pending = live._pending
        if pending is not None and pending.digest == state.digest:
            live._pending = None
        live._applied = state
        live._unacked = not ack
        step, at = live._applied_step, live._applied_at
    if ack and ackable(step):
        live._conn.send(protocol.applied(state.version, step, at=at, **held_fields(state)))


def _tell_agreed(live: LiveConfig, rank: int) -> None:
    """Tell the daemon that this process runs, in place of its newest state, the values
    the ranks agreed on, rank ``rank``'s (``applied`` with ``agreed``): when they were
    applied unacknowledged (``_apply_state``) and that state, at the same etcd revision,
    holds other values (the nodes' local layers differ), which this rank will not apply
    while the others run theirs. Without it, ``status`` and ``set --wait`` see a process
    that holds a state unapplied, as a hung one does. The ack names the restart-only
    keys the process runs at other values than that state's (``held``), as any ack
    does: without them its daemon would drop them from the process's entry, which then
    no longer said that they wait for a restart. Once per state of the daemon's and
    connection; called by ``StepSync.agree`` only when it installs another rank's
    values or keeps them, so ``apply``'s steady state costs nothing more."""
    with live._lock:
        applied, newest = live._applied, live._latest
        if (
            not live._unacked
            or newest is None
            or newest.revision != applied.revision
            or newest.digest == applied.digest
        ):
            return
        told = (newest.version, applied.revision, rank)
        if told == live._agreed_told:
            return
        live._agreed_told = told
        step, at = live._applied_step, live._applied_at
    if ackable(step):
        agreed = {"rank": rank, "revision": applied.revision}
        # ``newest`` is held at the values this process runs (``RestartOnlyHold.hold``), so
        # its held keys and their values are those of the values run, another rank's.
        held = held_fields(newest)
        live._conn.send(protocol.applied(newest.version, step, at=at, agreed=agreed, **held))


def _take_back_superseded(live: LiveConfig) -> None:
    """Make the daemon's state that a loaded checkpoint replaced the newest again (the
    ranks found a daemon newer than the checkpoint: ``StepSync.agree``)."""
    with live._lock:
        superseded, live._superseded = live._superseded, None
        if superseded is not None:
            live._latest = superseded
            live._pending = None if superseded.same_as(live._applied) else superseded


def _received_states(live: LiveConfig) -> tuple[State, ...]:
    """The last ``_HISTORY`` states received from the daemon, oldest first."""
    with live._lock:
        return tuple(live._received)
