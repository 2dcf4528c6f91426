"""``LiveConfig``: the hotknob client inside a training or inference process.

Two threads share one object and never wait on each other:

* a background thread (``connection.DaemonConnection``) owns the socket. Every
  snapshot and update it reads is frozen into a ``received.State`` there and kept as
  *pending* (``update.values`` carries the whole state, so coalescing is a
  replacement), and in a short history of received states. It never touches a
  binding or a callback.
* the training thread calls ``apply(step)`` at its safe point. With nothing
  pending that is one attribute compare; otherwise it takes the pending state,
  runs bindings and callbacks (``hooks.Hooks``) for the keys that changed, and queues the
  ``applied`` acknowledgement, which the background thread sends.

Under torch.distributed (``connect(distributed=True)``) ``apply`` instead asks
``distributed.StepSync`` every ``sync_every`` calls which received state every
rank applies; see that module for the protocol.

``values``, ``version`` and ``live[key]`` always describe what the process has
applied, never what is merely pending.

Jobs that live beside this module: ``restart_only`` holds each received state's
restart-only keys at the values the process runs, ``finding`` holds what
``connect`` checks before it waits and says when no state came, ``acks`` what an
acknowledgement can carry, ``checkpoint`` the format of ``state_dict``, and
``optimizer_slots`` which binding a new ``bind_optimizer`` replaces.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, Self, SupportsIndex

from . import checkpoint, protocol
from .acks import ack_errors, ackable, step_for_ack
from .binding import Binding, Handle
from .connection import DaemonConnection
from .errors import DaemonUnavailable as DaemonUnavailable
from .finding import DAEMON_SAID as DAEMON_SAID
from .finding import absolute, default_client_name, no_state, where_to_connect
from .hooks import Hooks
from .received import (
    MISSING,
    NOTHING,
    State,
    get_dotted,
    same_values,
    state_from_message,
    with_held,
)
from .reporting import MetricsReporter
from .restart_only import RestartOnlyHold, held_fields

if TYPE_CHECKING:
    from .distributed import StepSync
    from .optimizer_slots import OptimizerSlots

log = logging.getLogger("hotknob.model_runtime")

_HISTORY = 64

_REENTERED = (
    "LiveConfig.apply() (or load_state_dict) was called while an apply of the same LiveConfig "
    "was running: from an on_change callback or a binding, or from another thread. Call "
    "apply() at one safe point, on one thread; a callback must not call it (what arrives "
    "meanwhile is applied, in order, at the next apply())"
)


def _report_nothing(step: int, **metrics: Any) -> None:
    """``report`` after ``close``."""


class LiveConfig:
    """Live configuration pushed by a hotknob daemon, applied at the caller's safe point.

    Build it with ``LiveConfig.connect()``. Guarantees:

    * ``values``/``version``/``live[key]`` change only inside ``apply`` (or
      ``load_state_dict``), in the calling thread.
    * ``apply`` with nothing pending does one attribute compare: no lock, no
      system call.
    * Updates received between two ``apply`` calls coalesce: one apply, the
      newest values, one acknowledgement.
    * A binding or callback that raises is logged and reported to the daemon
      in the acknowledgement; the others still run and training goes on.
    * After the daemon goes away the last values stay in force and the client
      reconnects in the background; a restarted daemon's state is applied at the
      next ``apply`` only where it differs.
    * Under torch.distributed (``connect(distributed=True)``) every rank applies
      the same values at the same ``apply`` call; see ``docs/distributed.md``.
    """

    def __init__(
        self,
        path: str,
        client: str,
        hello_extra: Mapping[str, Any],
        sync: StepSync | None = None,
        app: str | None = None,
    ) -> None:
        """Use ``connect``; this only prepares the object and starts nothing. ``app``: the
        app asked for, if one was; a daemon of another app is refused."""
        self._path = path
        self._client = client
        self._app = app
        # Why the daemon at the other end is refused (it serves another app), else None:
        # none of its states is taken while it is.
        self._wrong_app: str | None = None
        self._sync = sync
        self._pending: State | None = None
        self._applied = NOTHING
        self._applied_step = 0
        self._applied_at = 0.0  # when (wall time) the applied state was applied
        self._unacked = False  # the applied values came from another rank (``_apply_state``)
        # What ``_tell_agreed`` last told this connection's daemon, if anything.
        self._agreed_told: tuple[int, int, int] | None = None
        self._applying = threading.Lock()  # held while an apply runs: one at a time
        self._apply_owner: int | None = None  # the thread that holds ``_applying``
        self._latest: State | None = None  # the newest state to converge to
        self._superseded: State | None = None  # the daemon's state a checkpoint replaced
        # The states received, for the ranks' agreement to find one another rank runs
        # (``distributed``): alone, the newest is all there is to keep. Each is a whole
        # configuration: 64 built anew took hundreds of MiB for a large one, where they
        # share what did not change between them now (``State.build``'s ``like``).
        self._received: deque[State] = deque(maxlen=_HISTORY if sync is not None else 1)
        self._restart_only = RestartOnlyHold()
        self._lock = threading.Lock()
        self._first_state = threading.Event()
        self._hooks = Hooks()
        self._optimizer_slots: OptimizerSlots | None = None  # made at the first bind_optimizer
        self._closed = False
        self._conn = DaemonConnection(
            path,
            protocol.hello(client, **hello_extra),
            self._on_message,
            name=f"hotknob-live-config[{client}]",
        )
        self._reporter = MetricsReporter(self._conn.send, name=f"hotknob-reporter[{client}]")
        # ``live.report(step, loss=...)``: bound directly, since a delegating method would
        # double the per-step cost (see model_runtime/reporting.py and ``report`` below).
        self.report = self._reporter.report
        _live_configs.add(self)

    @classmethod
    def connect(
        cls,
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

    def _start(self, timeout: float, app_name: str, *, given: bool) -> None:
        """``connect``'s wait for the first state (``given``: the socket was passed, or
        ``HOTKNOB_SOCKET`` named it)."""
        sync, path = self._sync, self._path
        self._conn.start()
        got_state = self._first_state.wait(timeout) and self._wrong_app is None
        everyone = got_state if sync is None else sync.all_true(got_state)
        if not everyone:
            # Under a group every rank is here: which ranks got nothing is one more
            # collective, so that each names them.
            silent = sync.ranks_without(got_state) if sync is not None else []
            reason = self._conn.last_error
            wrong_app = self._wrong_app
            self.close()
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
            self._apply_pending(0)
        else:
            sync.agree(self, 0)

    # -- what the process has applied -------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        """The applied value at a dotted key (a leaf, or a read-only section mapping)."""
        state = self._applied
        value = state.flat.get(key, MISSING)
        return get_dotted(state.values, key) if value is MISSING else value

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            self[key]
        except KeyError:
            return False
        return True

    def get(self, key: str, default: Any = None) -> Any:
        return get_dotted(self._applied.values, key, default)

    @property
    def values(self) -> Mapping[str, Any]:
        """All applied values, nested and read-only (sections are mapping proxies)."""
        return self._applied.values

    @property
    def version(self) -> int:
        return self._applied.version

    @property
    def revision(self) -> int:
        return self._applied.revision

    @property
    def pending_version(self) -> int:
        """The version of the newest state received and not yet applied, else ``version``."""
        pending = self._pending
        return self._applied.version if pending is None else pending.version

    @property
    def forked(self) -> bool:
        """True in a process forked from the one that connected (a DataLoader worker with
        the ``fork`` start method): there no update comes after the fork (a state the
        parent held pending at the fork is applied at the child's next ``apply``), and
        nothing is sent to the daemon. The child's first ``apply`` logs
        ``live_config_forked``."""
        return self._conn.forked

    def _after_fork_in_child(self) -> None:
        """In a forked child (``os.register_at_fork``): locks that a thread of the parent
        may have held at the fork are made new, and reports go nowhere (no thread sends
        them: they would pile up). Nothing logged here: a logging lock may be held too."""
        self._lock = threading.Lock()
        self._applying = threading.Lock()
        self._apply_owner = None
        self._first_state = threading.Event()  # its lock, too, may have been held
        self._first_state.set()
        self._reporter.forked()
        self.report = _report_nothing
        # Said at the child's first apply (its caller expects changes), by an instance
        # attribute that shadows the method once: nothing on the path of later calls.
        self.apply = self._first_apply_in_forked_child  # type: ignore[method-assign]

    def _first_apply_in_forked_child(self, step: int) -> bool:
        self.__dict__.pop("apply", None)
        log.warning(
            "live_config_forked pid=%d client=%s: this process was forked from the one "
            "that connected (a DataLoader worker, a worker of a pre-fork server): no "
            "change reaches it after the fork, nor does hotknob status show it; connect "
            "in this process, after the fork, for its own changes",
            os.getpid(),
            self._client,
        )
        return self.apply(step)

    @property
    def socket_path(self) -> str:
        return self._path

    # -- the safe point -----------------------------------------------------------------

    def apply(self, step: int) -> bool:
        """Apply the newest pending state, if any; return True if one was applied.

        Bindings, then ``on_change`` callbacks, run here in the calling thread for
        the keys whose values changed. The ``applied`` acknowledgement carries the
        version and ``step``; it is written here without blocking (what the socket does
        not take at once is left to the background thread).

        Under a process group this is a collective every ``sync_every`` calls:
        every rank must call it the same number of times, with the same steps (steps
        that differ at an agreement raise ``ValueError`` on every rank); it applies the state
        the ranks agree on, which may be older than the newest received, and returns
        True on every rank or on none: True when the agreed values changed (the same
        values renumbered by a restarted daemon are taken in and acknowledged, and
        return False).

        One apply at a time. Called from another thread while one runs (request
        threads of a server that each call it), it returns False at once and
        changes nothing: a state that came after the running apply began is
        applied at the next call. Called
        from inside a running apply (an ``on_change`` callback or a binding it
        runs) when it would apply something, it raises ``RuntimeError`` and
        changes nothing; the running apply goes on, and what arrived meanwhile
        waits for the next call. (A callback's exception is logged and reported in
        the ack, as any other.) With nothing pending it returns False at once.
        Under a process group, call it on one thread only.
        """
        if self._sync is not None:
            return self._sync.at_step(self, step)
        if self._pending is None:
            return False
        return self._apply_pending(step)

    def _begin_apply(self, *, other_thread_ok: bool = False) -> bool:
        """Enter an apply (or a checkpoint load, or the ranks' agreement): True, to be left
        with ``_end_apply``. If one is running: on this thread (nested, from a callback),
        ``RuntimeError``, since it would apply and acknowledge out of order; on another
        thread, False if ``other_thread_ok`` (that one applies the newest state), else
        ``RuntimeError`` too."""
        if self._applying.acquire(blocking=False):
            self._apply_owner = threading.get_ident()
            return True
        # Cleared before each release: a stale value is None or another thread's, never
        # this thread's, so a call from another thread is not taken for a nested one.
        if other_thread_ok and self._apply_owner != threading.get_ident():
            return False
        raise RuntimeError(_REENTERED)

    def _end_apply(self) -> None:
        self._apply_owner = None
        self._applying.release()

    def _apply_pending(self, step: int) -> bool:
        if not self._begin_apply(other_thread_ok=True):
            return False  # another thread is applying
        try:
            with self._lock:
                new, self._pending = self._pending, None
                if new is None:
                    return False
                old, self._applied = self._applied, new
                self._applied_step, self._applied_at = step, time.time()
                self._unacked = False
            self._after_apply(old, new, step, ack=True)
            return True
        finally:
            self._end_apply()

    def _apply_state(self, new: State, step: int, *, ack: bool) -> None:
        """Apply ``new`` (chosen by the ranks' agreement), pending or not.

        The pending state is cleared if it holds the same values. ``ack`` is False
        for values that came from another rank, whose version is another daemon's; they
        are acknowledged when this rank's daemon sends the same values (``_adopt``).
        Called by ``StepSync.agree``, inside its ``_begin_apply``.
        """
        with self._lock:
            pending = self._pending
            if pending is not None and pending.digest == new.digest:
                self._pending = None
            old, self._applied = self._applied, new
            self._applied_step, self._applied_at = step, time.time()
            self._unacked = not ack
            if old is NOTHING and self._restart_only.keys:
                self._hold_received()
        self._after_apply(old, new, step, ack=ack)

    def _hold_received(self) -> None:
        """Hold the states received so far (``RestartOnlyHold.hold``) at the restart-only
        values of the first state applied, under ``_lock``. They came before anything was
        applied, so they are as the daemon sent them; under a group the first state applied
        may be another rank's, whose daemon holds other restart-only values (it started
        before a restart-only ``set``, this one after). Unheld, this rank's newest would
        never show the values it runs, so it would never acknowledge them, and, chosen at a
        later agreement, it would change a restart-only key on every rank."""
        applied = self._applied
        held = {id(state): self._restart_only.hold(state, applied) for state in self._received}
        self._received = deque(held.values(), maxlen=self._received.maxlen)
        latest, pending = self._latest, self._pending
        if latest is not None:
            self._latest = held.get(id(latest), latest)
        if pending is not None:
            self._pending = held.get(id(pending), pending)

    def _adopt(self, state: State) -> bool:
        """If the applied values came from another rank unacknowledged and ``state``, sent
        by this rank's daemon, holds the same values: make ``state`` the applied one (its
        version is this daemon's) and acknowledge it (``_renumbered``). True if it did."""
        with self._lock:
            if not self._unacked or state.digest != self._applied.digest:
                return False
        self._renumbered(state, ack=True)
        return True

    def _renumbered(self, state: State, *, ack: bool) -> None:
        """Make ``state``, which holds the applied values under another version or revision
        (this rank's daemon's own, or the one it renumbered them with at a restart), the
        applied one; ``ack`` it at the step those values were applied, as a single process
        does (``_receive``): ``status``, checkpoints and guards place the change there.
        Nothing runs: no value changes. Called by ``StepSync.agree``."""
        with self._lock:
            pending = self._pending
            if pending is not None and pending.digest == state.digest:
                self._pending = None
            self._applied = state
            self._unacked = not ack
            step, at = self._applied_step, self._applied_at
        if ack and ackable(step):
            self._conn.send(protocol.applied(state.version, step, at=at, **held_fields(state)))

    def _tell_agreed(self, rank: int) -> None:
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
        with self._lock:
            applied, newest = self._applied, self._latest
            if (
                not self._unacked
                or newest is None
                or newest.revision != applied.revision
                or newest.digest == applied.digest
            ):
                return
            told = (newest.version, applied.revision, rank)
            if told == self._agreed_told:
                return
            self._agreed_told = told
            step, at = self._applied_step, self._applied_at
        if ackable(step):
            agreed = {"rank": rank, "revision": applied.revision}
            # ``newest`` is held at the values this process runs (``RestartOnlyHold.hold``), so
            # its held keys and their values are those of the values run, another rank's.
            held = held_fields(newest)
            self._conn.send(protocol.applied(newest.version, step, at=at, agreed=agreed, **held))

    def _after_apply(self, old: State, new: State, step: int, *, ack: bool) -> None:
        errors = self._hooks.run(old, new)
        # The ack needs an ``int`` step (``apply(np.int64(3))`` is common with ``np.arange``).
        # A step that is no integer at all does not stop the apply: raising here, after
        # the values changed, would leave them applied but unannounced, and raising before
        # would make a run with such a step crash at the first live change, maybe hours in,
        # for a step the apply itself does not need. It is logged at each such apply (one
        # per change, not per step) and the change goes unacknowledged: ``status`` does not
        # show it and guards do not watch the process, as they could not place its window.
        number = step  # the common case, on the training thread: nothing to do
        if not ackable(step):
            converted = self._step_for_ack(step, new)
            if converted is None:
                return
            number = converted
        if not ack:
            return
        if errors or new.held:
            fields = held_fields(new)
            if errors:
                fields["errors"] = ack_errors(errors)
            self._conn.send(protocol.applied(new.version, number, **fields))
        else:  # the usual ack, on the training thread: formatted, not encoded
            self._conn.send_line(protocol.applied_line(new.version, number), protocol.APPLIED)

    def _step_for_ack(self, step: Any, new: State) -> int | None:
        """``step`` converted for the ack (and kept for a reconnect's ack and ``state_dict``),
        or None, logged, if it is no integer at all (``acks.step_for_ack``)."""
        number = step_for_ack(step, new.version)
        if number is None:
            return None
        with self._lock:
            if self._applied is new:
                self._applied_step = number  # what a reconnect's ack and ``state_dict`` carry
        return number

    def _take_back_superseded(self) -> None:
        """Make the daemon's state that a loaded checkpoint replaced the newest again (the
        ranks found a daemon newer than the checkpoint: ``StepSync.agree``)."""
        with self._lock:
            superseded, self._superseded = self._superseded, None
            if superseded is not None:
                self._latest = superseded
                self._pending = None if superseded.same_as(self._applied) else superseded

    def _received_states(self) -> tuple[State, ...]:
        """The last ``_HISTORY`` states received from the daemon, oldest first."""
        with self._lock:
            return tuple(self._received)

    # -- registrations -----------------------------------------------------------------

    def on_change(self, key: str, fn: Callable[..., object]) -> Handle:
        """Call ``fn(new)`` or ``fn(new, old)`` in ``apply`` whenever ``key``'s value changes.

        ``key`` may be a leaf (``train.lr``) or a section (``train``: fires once
        when any key under it changes). Not called for the values in force at
        registration; read ``live[key]`` for those. A key the values in force do not
        have (a typo, ``train.lrr``) is registered all the same, since a mapping-valued
        key may gain it later, with a warning: else it would never fire, unseen.
        """
        if key not in self:
            log.warning(
                "live_on_change_unknown_key key=%.200s: no such key in the values in force "
                "(a typo?); the callback runs only if a change brings it",
                key,
            )
        return self._hooks.on_change(key, fn)

    def add_binding(self, binding: Binding) -> Handle:
        """Register ``binding``; it runs in every ``apply`` that changes a value.

        Bindings run in registration order, before ``on_change`` callbacks.
        """
        return self._hooks.add_binding(binding)

    def bind_optimizer(
        self,
        optimizer: Any,
        scheduler: Any = None,
        *,
        lr: str | None = "train.lr",
        weight_decay: str | None = "train.weight_decay",
        momentum: str | None = "train.momentum",
    ) -> Handle:
        """Drive ``optimizer``'s param groups (and ``scheduler``) from live values.

        The optimizer takes the applied values at once, then follows every apply.
        A key given as ``None`` is left alone. Binding an optimizer again (or a
        wrapper around it that shares its param groups, found by its ``optimizer``
        attribute) for a key it is already bound for replaces that binding (two
        would apply every change twice, which compounds under
        ``ReduceLROnPlateau``); that is how its group ratios are taken anew, but
        for what a live 0 hid (``OptimizerBinding.inherit``). A binding for other
        keys stays. A bind refused (``InvalidValue``: a value, or a scheduler not
        given) writes nothing, and the earlier binding stays. Imports torch only
        here.
        """
        try:
            from .optimizer_slots import OptimizerSlots
        except ModuleNotFoundError as exc:
            if exc.name != "torch":
                raise
            raise ModuleNotFoundError(
                "bind_optimizer needs torch, which this Python cannot import: install it "
                "(pip install 'hotknob[torch]', or the torch build for your machine)",
                name="torch",
            ) from exc

        slots = self._optimizer_slots
        if slots is None:
            slots = self._optimizer_slots = OptimizerSlots(self._hooks)
        return slots.bind(
            self._applied.flat_view,
            optimizer,
            scheduler,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
        )

    # -- reporting (model_runtime/reporting.py) ----------------------------------------
    #
    # ``live.report(step, **metrics)`` (bound in ``__init__``) records numbers at
    # ``step``, e.g. ``live.report(step, loss=loss.item())``. Cheap enough for every
    # step: no lock, no system call. The values since the last message are sent about
    # every ``$HOTKNOB_REPORT_EVERY_S`` seconds (default 1); the daemon shows them in
    # ``status`` and checks guards on them.

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The applied version, revision, step and values, plus each binding's own state.

        Plain dicts and lists only, so ``torch.save`` and JSON both carry it.
        """
        state = self._applied
        bindings = self._hooks.binding_states()
        return checkpoint.saved(state, self._applied_step, bindings)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Make a checkpoint's values the applied ones.

        Bindings get their saved state back first (register them before
        loading, in the order the saving run first registered them: a rebind
        keeps the place of the binding it replaced), then bindings and callbacks
        see the keys the checkpoint changed, so every bound object agrees with
        ``values``. A saved binding state that does not fit the binding in its
        place (``OptimizerBinding``: other keys, or groups of other sizes) raises
        ``ValueError`` and changes nothing. If the daemon has
        already sent a state newer than the checkpoint's (a higher version, or one built
        from a later etcd revision: etcd moved on since the checkpoint was saved, which
        also tells a daemon that restarted without its state dir, its versions begun
        again at 1), that state becomes pending and wins at the next ``apply``; else
        the checkpoint stays in force,
        and the daemon's state it replaced does not come back by itself (a reconnect
        that re-sends that state, the same values at the same etcd revision, changes
        nothing, whatever version a restarted daemon gives it). Anything else the daemon
        sends after the load is a new edit and is applied as usual.

        Under torch.distributed the ranks decide together, at the next agreement:
        each rank's daemon numbers its versions itself, so one rank may find its
        daemon newer than the checkpoint where another does not. If any rank does,
        every rank takes its daemon's state back and the ranks agree on it as on any
        change; else the checkpoint stays in force on every rank.
        """
        loaded = checkpoint.read(state_dict)
        step = state_dict.get("step", 0)
        self._begin_apply()
        try:
            self._load(loaded, step, state_dict.get("bindings") or [])
        finally:
            self._end_apply()

    def _load(self, loaded: State, step: Any, binding_states: list[Any]) -> None:
        self._hooks.load_binding_states(binding_states)
        with self._lock:
            # The daemon's newest state: the one an earlier checkpoint replaced, if one did.
            latest = self._superseded or self._latest
            newer = latest is not None and checkpoint.newer_than(latest, loaded)
            agreed = self._applied if self._sync is not None else None
            running = self._restart_only.at_load(latest if newer else None, agreed)
            if running:
                # A resumed run starts with the daemon's restart-only values, at once: read
                # after the load (a data loader built with the batch size), they must not
                # change at the first apply.
                loaded = with_held(loaded, running)
                loaded.held = ()
            old, self._applied = self._applied, loaded
            self._unacked = False
            self._applied_step = step if isinstance(step, int) else 0
            self._applied_at = time.time()
            self._pending = latest if newer else None
            if newer:
                self._superseded = None
                self._latest = latest
            else:
                self._superseded = latest
                self._latest = loaded  # what the ranks converge to, under a group
        if self._sync is None:
            self._hooks.run(old, loaded)
            return
        self._sync.loaded(loaded, newer=newer)
        with self._sync.uncounted():
            self._hooks.run(old, loaded)

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop and join the background thread and close the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._reporter.stop()
        self.report = _report_nothing  # nothing is sent any more: keep nothing either
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LiveConfig {self._path} version={self.version} pending={self.pending_version}>"

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        """Refused (``pickle``, ``copy.copy``, ``copy.deepcopy``): a copy would share or
        lose the connection, the background thread and the bindings."""
        raise TypeError(
            "a LiveConfig cannot be pickled or copied: it owns the connection to the daemon, "
            "a background thread and the bindings. Pass what the other side needs instead "
            "(live['train.lr'], or live.state_dict()['values'] as plain dicts), or call "
            "LiveConfig.connect() in the worker process itself"
        )

    # -- on the background thread ------------------------------------------------------

    def _on_message(self, message: Mapping[str, Any], is_snapshot: bool) -> None:
        if is_snapshot:
            served = message.get("app")
            if self._app is not None and isinstance(served, str) and served != self._app:
                self._refuse_app(served)
                return
            self._wrong_app = None
        elif self._wrong_app is not None:
            return  # an update of the daemon refused at its snapshot
        if is_snapshot:
            self._restart_only.keys = protocol.restart_only_keys(message)
            secret = self._restart_only.secret = protocol.secret_keys(message)
            self._hooks.secret = secret  # a failure's text masks their values
        # A rank keeps the last states for the ranks' agreement: each shares with the one
        # before all that did not change. Alone, it keeps one, and builds each anew.
        received = self._received
        like = received[-1] if received.maxlen != 1 and received else None
        state = state_from_message(message, like)
        applied = self._applied
        if self._restart_only.keys:
            state = self._restart_only.hold(state, applied)
        self._receive(state, is_snapshot, held_at=applied)

    def _refuse_app(self, served: str) -> None:
        """The daemon at the socket serves another app than the one asked for (a
        ``HOTKNOB_SOCKET`` left from another job): none of its values may reach this
        process. ``connect`` raises at once; after it, the values in force stay and the
        connection's states are dropped until a daemon of the app asked for answers."""
        said = self._wrong_app is not None
        self._wrong_app = (
            f"the hotknob daemon at {self._path} serves app {served!r}, not {self._app!r}: "
            "check socket= (or HOTKNOB_SOCKET) and app= (or HOTKNOB_APP)"
        )
        if not self._first_state.is_set():
            self._first_state.set()  # ``connect`` says why, without waiting for its timeout
        elif not said:
            log.error("live_wrong_app %s; the values in force stay", self._wrong_app)

    def _receive(self, state: State, is_snapshot: bool, held_at: State = NOTHING) -> None:
        """Keep ``state`` as pending unless it is exactly what is already applied, or the
        daemon's state a loaded checkpoint replaced, sent again: its values at its etcd
        revision, under any version (a daemon restarted after a crash numbers its state
        anew, above the one it had). ``held_at``: the applied state ``state`` was held at
        (``RestartOnlyHold.hold``)."""
        with self._lock:
            if is_snapshot:  # a new connection: its daemon was told nothing yet
                self._agreed_told = None
            if held_at is NOTHING and self._applied is not NOTHING and self._restart_only.keys:
                # The first apply came in between: it held those received before it
                # (``_hold_received``), and this one is held here.
                state = self._restart_only.hold(state, self._applied)
            self._received.append(state)
            applied = self._applied
            superseded = self._superseded
            if (
                superseded is not None
                and same_values(state.flat, superseded.flat)
                and state.revision == superseded.revision
            ):
                up_to_date = True  # sent again: the loaded checkpoint stays in force
            else:
                self._superseded = None  # a new edit: from now on, the daemon's state wins
                self._latest = state
                up_to_date = state.same_as(applied)
                self._pending = None if up_to_date else state
            step, at = self._applied_step, self._applied_at
        # A step no ack can carry (``apply(5.5)``: logged at that apply) is not sent: the
        # daemon would close the connection, and each reconnect would send it again.
        if up_to_date and is_snapshot and ackable(step):
            held = held_fields(state)
            # ``at``: the values were applied then, not at this reconnect (``status``'s age).
            self._conn.send(protocol.applied(applied.version, step, at=at, **held))
        if not self._first_state.is_set():  # ``set`` takes a lock and notifies: once is enough
            self._first_state.set()


_live_configs: weakref.WeakSet[LiveConfig] = weakref.WeakSet()
"""Every ``LiveConfig`` made in this process, for the at-fork hook."""


def _after_fork_in_child() -> None:
    for live in list(_live_configs):
        live._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
