"""``LiveConfig``: the hotknob client inside a training or inference process.

Two threads share one object and never wait on each other:

* a background thread owns the socket. It says ``hello``, reads snapshots and
  updates, and keeps only the newest one as *pending* (``update.values``
  carries the whole state, so coalescing is a replacement). After the daemon
  goes away it reconnects with capped, jittered backoff. It never touches a
  binding or a callback.
* the training thread calls ``apply(step)`` at its safe point. With nothing
  pending that is one attribute compare; otherwise it takes the pending state,
  runs bindings and callbacks for the keys that changed, and queues the
  ``applied`` acknowledgement, which the background thread sends.

``values``, ``version`` and ``live[key]`` always describe what the process has
applied, never what is merely pending.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import random
import selectors
import socket as _socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Self

from . import protocol
from .binding import Binding, Handle
from .errors import DaemonUnavailable

log = logging.getLogger("hotknob.model_runtime")

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0
_CONNECT_TIMEOUT = 1.0
_STATE_DICT_FORMAT = 1
_MISSING: Any = object()


def _freeze(value: Any) -> Any:
    """A read-only deep copy: mappings become mapping proxies, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """A plain, mutable deep copy of a frozen value (dicts and lists)."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted key; a non-empty mapping is a section, anything else a leaf."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _get_dotted(nested: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    node: Any = nested
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def _prefixes(keys: Iterator[str] | list[str]) -> set[str]:
    """Every section path and key touched: ``a.b.c`` gives ``a``, ``a.b``, ``a.b.c``."""
    touched: set[str] = set()
    for key in keys:
        parts = key.split(".")
        touched.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return touched


@dataclass(frozen=True, slots=True)
class _State:
    """One whole configuration as the daemon sent it, frozen once, off the training thread."""

    version: int
    revision: int
    values: Mapping[str, Any]
    flat: dict[str, Any]
    flat_view: Mapping[str, Any]

    @classmethod
    def build(cls, version: int, revision: int, values: Mapping[str, Any]) -> _State:
        frozen = _freeze(values)
        flat = _flatten(frozen)
        return cls(version, revision, frozen, flat, MappingProxyType(flat))

    def same_as(self, other: _State) -> bool:
        return self.version == other.version and self.flat == other.flat


_NOTHING = _State.build(-1, 0, {})


def _state_from_message(message: Mapping[str, Any]) -> _State:
    for field in ("version", "revision"):
        value = message.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise protocol.ProtocolError(f'"{message["type"]}" needs an integer "{field}" >= 0')
    values = message.get("values")
    if not isinstance(values, dict):
        raise protocol.ProtocolError(f'"{message["type"]}" needs an object "values"')
    return _State.build(message["version"], message["revision"], values)


@dataclass(frozen=True, slots=True)
class _Callback:
    key: str
    fn: Callable[..., None]
    wants_old: bool


def _wants_old(fn: Callable[..., None]) -> bool:
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): call with the new value only
        return False
    return True


def _binding_state(binding: Binding) -> Any:
    save = getattr(binding, "state_dict", None)
    return save() if callable(save) else None


def _default_client_name() -> str:
    name = f"{_socket.gethostname()}-{os.getpid()}"
    dist = sys.modules.get("torch.distributed")  # only if the process already imported it
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                name += f"-rank{dist.get_rank()}"
        except Exception:  # a half-initialised group must not stop the connect
            pass
    return name


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
    """

    def __init__(self, path: str, client: str, hello_extra: Mapping[str, Any]) -> None:
        """Use ``connect``; this only prepares the object and starts nothing."""
        self._path = path
        self._hello = protocol.hello(client, **hello_extra)
        self._pending: _State | None = None
        self._applied = _NOTHING
        self._applied_step = 0
        self._latest: _State | None = None
        self._lock = threading.Lock()
        self._first_state = threading.Event()
        self._stop = threading.Event()
        self._outbox: deque[bytes] = deque()
        self._last_error = ""
        self._ids = itertools.count()
        self._bindings: dict[int, Binding] = {}
        self._callbacks: dict[int, _Callback] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"hotknob-live-config[{client}]", daemon=True
        )

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
        **hello_extra: Any,
    ) -> LiveConfig:
        """Connect to the daemon and apply its first snapshot before returning.

        The socket is ``socket``, else ``$HOTKNOB_SOCKET``, else the default path
        of ``app`` (else ``$HOTKNOB_APP``, else ``default``). ``client`` names
        this process in the daemon's status (default ``HOST-PID``, plus
        ``-rankN`` when torch.distributed is already initialised). Extra keyword
        arguments travel in the ``hello`` message.

        Raises ``DaemonUnavailable`` if no snapshot arrives within ``timeout``
        seconds, and ``ValueError`` if distributed apply is requested: this
        version applies per process only.
        """
        if distributed or process_group is not None:
            raise ValueError("distributed apply is not available in this version")
        app_name = app or os.environ.get("HOTKNOB_APP") or "default"
        if socket is not None:
            path = os.fspath(socket)
        else:
            path = str(protocol.default_socket_path(app_name))
        live = cls(path, client or _default_client_name(), hello_extra)
        live._thread.start()
        if not live._first_state.wait(timeout):
            reason = live._last_error
            live.close()
            raise DaemonUnavailable(
                f"no hotknob daemon at {path} after {timeout:g} s: start one with "
                f"`hotknob run --app {app_name}`, or pass socket= / set HOTKNOB_SOCKET"
                + (f" (last error: {reason})" if reason else ""),
                path=path,
                app=app_name,
            )
        live._apply_pending(0)
        return live

    # -- what the process has applied -------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        """The applied value at a dotted key (a leaf, or a read-only section mapping)."""
        state = self._applied
        value = state.flat.get(key, _MISSING)
        return _get_dotted(state.values, key) if value is _MISSING else value

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            self[key]
        except KeyError:
            return False
        return True

    def get(self, key: str, default: Any = None) -> Any:
        return _get_dotted(self._applied.values, key, default)

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
    def socket_path(self) -> str:
        return self._path

    # -- the safe point -----------------------------------------------------------------

    def apply(self, step: int) -> bool:
        """Apply the newest pending state, if any; return True if one was applied.

        Bindings, then ``on_change`` callbacks, run here in the calling thread for
        the keys whose values changed. The ``applied`` acknowledgement carries the
        version and ``step`` and is sent by the background thread.
        """
        if self._pending is None:
            return False
        return self._apply_pending(step)

    def _apply_pending(self, step: int) -> bool:
        with self._lock:
            new, self._pending = self._pending, None
            if new is None:
                return False
            old, self._applied = self._applied, new
            self._applied_step = step
        errors = self._run_hooks(old, new)
        extra: dict[str, Any] = {"errors": errors} if errors else {}
        self._send(protocol.applied(new.version, step, **extra))
        return True

    def _run_hooks(self, old: _State, new: _State) -> list[dict[str, str]]:
        changed = {k: v for k, v in new.flat.items() if old.flat.get(k, _MISSING) != v}
        if not changed:
            return []
        errors: list[dict[str, str]] = []
        changed_view = MappingProxyType(changed)
        for binding in list(self._bindings.values()):
            try:
                binding.apply(new.flat_view, changed_view)
            except Exception as exc:
                name = type(binding).__name__
                log.exception("live_binding_failed binding=%s version=%d", name, new.version)
                errors.append({"binding": name, "error": f"{type(exc).__name__}: {exc}"})
        touched = _prefixes(list(changed))
        for callback in list(self._callbacks.values()):
            if callback.key not in touched:
                continue
            value = self[callback.key]
            try:
                if callback.wants_old:
                    callback.fn(value, _get_dotted(old.values, callback.key, None))
                else:
                    callback.fn(value)
            except Exception as exc:
                log.exception("live_callback_failed key=%s version=%d", callback.key, new.version)
                errors.append({"key": callback.key, "error": f"{type(exc).__name__}: {exc}"})
        return errors

    # -- registrations -----------------------------------------------------------------

    def on_change(self, key: str, fn: Callable[..., None]) -> Handle:
        """Call ``fn(new)`` or ``fn(new, old)`` in ``apply`` whenever ``key``'s value changes.

        ``key`` may be a leaf (``train.lr``) or a section (``train``: fires once
        when any key under it changes). Not called for the values in force at
        registration; read ``live[key]`` for those.
        """
        ident = next(self._ids)
        self._callbacks[ident] = _Callback(key, fn, _wants_old(fn))
        return Handle(partial(self._callbacks.pop, ident, None))

    def add_binding(self, binding: Binding) -> Handle:
        """Register ``binding``; it runs in every ``apply`` that changes a value.

        Bindings run in registration order, before ``on_change`` callbacks.
        """
        ident = next(self._ids)
        self._bindings[ident] = binding
        return Handle(partial(self._bindings.pop, ident, None))

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
        A key given as ``None`` is left alone. Imports torch only here.
        """
        from .optim import OptimizerBinding

        binding = OptimizerBinding(
            optimizer, scheduler, lr=lr, weight_decay=weight_decay, momentum=momentum
        )
        values = self._applied.flat_view
        binding.apply(values, values)
        return self.add_binding(binding)

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The applied version, revision, step and values, plus each binding's own state.

        Plain dicts and lists only, so ``torch.save`` and JSON both carry it.
        """
        state = self._applied
        bindings = [_binding_state(b) for b in self._bindings.values()]
        return {
            "format": _STATE_DICT_FORMAT,
            "version": state.version,
            "revision": state.revision,
            "step": self._applied_step,
            "values": _thaw(state.values),
            "bindings": bindings,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Make a checkpoint's values the applied ones.

        Bindings get their saved state back first (register them before
        loading), then bindings and callbacks see the keys the checkpoint
        changed, so every bound object agrees with ``values``. If the daemon has
        already sent a newer version than the checkpoint's, that state becomes
        pending and wins at the next ``apply``; anything the daemon sends after
        the load is a new edit and is applied as usual.
        """
        try:
            fmt = state_dict.get("format", _STATE_DICT_FORMAT)
            if fmt != _STATE_DICT_FORMAT:
                raise ValueError(f"unsupported LiveConfig state_dict format {fmt!r}")
            loaded = _state_from_message({"type": "state_dict", **state_dict})
        except protocol.ProtocolError as exc:
            raise ValueError(f"not a LiveConfig state_dict: {exc}") from exc
        step = state_dict.get("step", 0)
        self._load_binding_states(state_dict.get("bindings") or [])
        with self._lock:
            old, self._applied = self._applied, loaded
            self._applied_step = step if isinstance(step, int) else 0
            latest = self._latest
            newer = latest is not None and latest.version > loaded.version
            self._pending = latest if newer else None
        self._run_hooks(old, loaded)

    def _load_binding_states(self, saved: list[Any]) -> None:
        bindings = list(self._bindings.values())
        if any(s is not None for s in saved) and len(saved) != len(bindings):
            raise ValueError(
                f"checkpoint holds state for {len(saved)} bindings but {len(bindings)} are "
                "registered: bind the same objects before load_state_dict"
            )
        for binding, state in zip(bindings, saved, strict=False):
            if state is None:
                continue
            load = getattr(binding, "load_state_dict", None)
            if not callable(load):
                raise ValueError(f"{type(binding).__name__} cannot load its checkpointed state")
            load(state)

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop and join the background thread and close the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LiveConfig {self._path} version={self.version} pending={self.pending_version}>"

    # -- the background thread ---------------------------------------------------------

    def _send(self, message: Mapping[str, Any]) -> None:
        """Queue a message for the background thread; never blocks the caller."""
        if self._closed:
            return
        try:
            self._outbox.append(protocol.encode(message))
        except protocol.ProtocolError:
            log.exception("live_message_unencodable type=%s", message.get("type"))
            return
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # a full pipe already wakes the thread
            pass

    def _run(self) -> None:
        delay = _BACKOFF_MIN
        connected_before = False
        while not self._stop.is_set():
            try:
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                try:
                    sock.settimeout(_CONNECT_TIMEOUT)
                    sock.connect(self._path)
                    if connected_before:
                        log.info("live_reconnected path=%s", self._path)
                    connected_before = True
                    if self._serve(sock):
                        delay = _BACKOFF_MIN
                    if not self._stop.is_set():
                        log.warning(
                            "live_disconnected path=%s error=%s", self._path, self._last_error
                        )
                finally:
                    sock.close()
            except OSError as exc:
                self._last_error = exc.strerror or str(exc)
            except Exception as exc:  # the thread must outlive any surprise
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("live_client_error path=%s", self._path)
            if self._stop.wait(delay * random.uniform(0.5, 1.0)):
                break
            delay = min(delay * 2, _BACKOFF_MAX)

    def _serve(self, sock: _socket.socket) -> bool:
        """Talk on one connection until EOF, an error or ``close``; True if a state came."""
        sock.setblocking(False)
        self._outbox.clear()  # acks of an earlier connection; a fresh snapshot follows
        out = bytearray(protocol.encode(self._hello))
        inbuf = bytearray()
        got_state = False
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    while self._outbox:
                        out += self._outbox.popleft()
                    sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0))
                    for key, mask in sel.select():
                        if key.fileobj == self._wake_r:
                            self._drain_wake()
                            continue
                        if mask & selectors.EVENT_WRITE:
                            del out[: sock.send(out)]
                        if mask & selectors.EVENT_READ:
                            data = sock.recv(65536)
                            if not data:
                                self._last_error = "the daemon closed the connection"
                                return got_state
                            inbuf += data
                            got_state |= self._read_lines(inbuf)
            except OSError as exc:
                self._last_error = exc.strerror or str(exc)
            except protocol.ProtocolError as exc:
                self._last_error = f"protocol error: {exc}"
        return got_state

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _read_lines(self, inbuf: bytearray) -> bool:
        got_state = False
        while (end := inbuf.find(b"\n")) >= 0:
            line = bytes(inbuf[: end + 1])
            del inbuf[: end + 1]
            message = protocol.decode(line)
            kind = message["type"]
            if kind in (protocol.SNAPSHOT, protocol.UPDATE):
                self._receive(_state_from_message(message), kind == protocol.SNAPSHOT)
                got_state = True
            elif kind == protocol.ERROR:
                self._last_error = f"daemon: {message.get('error')}"
                log.warning("live_daemon_error path=%s error=%s", self._path, message.get("error"))
        if len(inbuf) >= protocol.MAX_LINE_BYTES:
            raise protocol.ProtocolError("line exceeds the size limit")
        return got_state

    def _receive(self, state: _State, is_snapshot: bool) -> None:
        """Keep ``state`` as pending unless it is exactly what is already applied."""
        with self._lock:
            self._latest = state
            applied = self._applied
            up_to_date = state.same_as(applied)
            self._pending = None if up_to_date else state
            step = self._applied_step
        if up_to_date and is_snapshot:
            self._send(protocol.applied(applied.version, step))
        self._first_state.set()
