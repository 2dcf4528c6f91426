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

Jobs that live beside this module, their functions bound here as ``LiveConfig``'s
methods: ``connecting`` (``connect``), ``receiving`` (each message, on the background
thread), ``agreement_side`` (a rank's part in the ranks' agreement), ``checkpoint_load``
(``load_state_dict``) and ``forking`` (a forked child). Others: ``restart_only`` holds each
received state's restart-only keys at the values the process runs, ``finding`` holds what
``connect`` checks before it waits and says when no state came, ``acks`` what an
acknowledgement can carry, ``checkpoint`` the format of ``state_dict``, and
``optimizer_slots`` which binding a new ``bind_optimizer`` replaces.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, Self, SupportsIndex

from . import agreement_side, checkpoint, checkpoint_load, connecting, protocol, receiving
from .acks import ack_errors, ackable, step_for_ack
from .binding import Binding, Handle
from .connection import DaemonConnection
from .errors import DaemonUnavailable as DaemonUnavailable
from .finding import DAEMON_SAID as DAEMON_SAID
from .forking import after_fork_in_child, first_apply_in_forked_child, live_configs, report_nothing
from .hooks import Hooks
from .received import MISSING, NOTHING, State, get_dotted
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
        live_configs.add(self)

    # -- connecting (model_runtime/connecting.py): ``connect``, and its wait (``_start``) --

    connect = classmethod(connecting.connect)
    _start = connecting._start

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

    # In a forked child (model_runtime/forking.py): the at-fork hook, and the first apply.
    _after_fork_in_child = after_fork_in_child
    _first_apply_in_forked_child = first_apply_in_forked_child

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

    # -- the ranks' agreement (model_runtime/agreement_side.py) ------------------------
    #
    # Called by ``distributed.StepSync``, under a process group only.

    _apply_state = agreement_side._apply_state
    _hold_received = agreement_side._hold_received
    _adopt = agreement_side._adopt
    _renumbered = agreement_side._renumbered
    _tell_agreed = agreement_side._tell_agreed
    _take_back_superseded = agreement_side._take_back_superseded
    _received_states = agreement_side._received_states

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

    # ``load_state_dict`` (model_runtime/checkpoint_load.py): a checkpoint's values made
    # the applied ones.
    load_state_dict = checkpoint_load.load_state_dict
    _load = checkpoint_load._load

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop and join the background thread and close the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._reporter.stop()
        self.report = report_nothing  # nothing is sent any more: keep nothing either
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

    # -- on the background thread (model_runtime/receiving.py): each message read -------

    _on_message = receiving._on_message
    _refuse_app = receiving._refuse_app
    _receive = receiving._receive
