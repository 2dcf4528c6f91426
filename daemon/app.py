"""``hotknob run``: the sidecar's lifecycle — start in order, serve, stop in reverse.

Start: the socket path and the state file are taken first (each by a lock held
for the daemon's life; either held by another daemon stops the start at once,
before anything is read or written); static layers (defaults, env, cli) and
the files are read and must be valid; etcd is read at one revision and watched
from the next (or, if etcd cannot be reached within ``etcd_start_timeout``, the
last-known-good from the state dir is served and the watch keeps retrying); the
socket opens last, when there is a configuration to serve. The event loop runs
the engine: watcher threads hand their events over with ``call_soon_threadsafe``,
the one hop from a library thread into the loop — except an etcd change that comes
alone, which the watch thread validates, publishes and writes to the clients
itself (``EtcdIntake._take_inline``), without that hop. Either way the engine and the
push state (``push.Pusher``) are used under ``_lock``. The rest of that change's work
runs a little later, once the clients applied it, and what they send meanwhile waits for
it (``held_tail.HeldTail``). etcd's events reach the engine along
``etcd_intake.EtcdIntake``, the config files' along their own path
(``files_feed.FilesFeed``).

Signals only request things: SIGTERM/SIGINT a stop (a second SIGINT forces
it; one during the start's wait for etcd abandons the start: no socket is
opened), SIGHUP a re-read of the files. Stop runs in reverse start order and
is bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotknob.config import Layer, files_layer, restart_only_keys
from hotknob.config.schema_facts import schema_facts
from hotknob.model_runtime.protocol import default_socket_path

from . import healthz, signals
from .context import Context
from .engine import Engine
from .etcd_intake import EtcdIntake
from .etcd_store import EtcdStore
from .feedback import ClientFeedback
from .files_feed import FilesFeed
from .guards import GuardManager
from .held_tail import HeldTail
from .logs import get_logger
from .metrics import Metrics, MetricsServer
from .published import Published
from .push import Pusher
from .reports import REPORT_STATUS_EVERY_S
from .socket_server import SocketServer
from .state import StateStore
from .status import StatusPublisher

PUSH_EVERY_S = 0.002


class _StartAbandoned(Exception):
    """A stop was asked for during the start: it ends there, as a normal stop."""


@dataclass
class DaemonOptions:
    socket_path: Path
    state_dir: Path
    metrics_addr: str | None = None
    node: str = field(default_factory=socket.gethostname)
    etcd_start_timeout: float = 1.0
    status_ttl: int = 10
    status_every: float = REPORT_STATUS_EVERY_S


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "hotknob"


class Daemon:
    def __init__(self, ctx: Context, layers: list[Layer], options: DaemonOptions):
        self.ctx = ctx
        self.options = options
        self.static_layers = layers
        self.log = get_logger("hotknob.daemon", app=ctx.app)
        self.metrics = Metrics(ctx.app, options.node)
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._early: list[Callable[[], None]] = []
        # Held while the engine or the push state is used: by the loop's handlers, and by
        # the etcd watch thread while it handles a lone change itself.
        self._lock = threading.RLock()
        self._loop_thread: int | None = None
        # Clients get a lone change at once, a burst's newest at most every PUSH_EVERY_S.
        self.pushes = Pusher(
            PUSH_EVERY_S,
            lock=self._lock,
            on_loop=self._on_loop,
            post=self._post,
            metrics=self.metrics,
        )
        # A lone change's work after its push, and what clients send meanwhile.
        self.tail = HeldTail(lambda: self.engine, self._lock, self._dispatch, self.log)
        self._accepted_counters: dict[str, Any] = {}
        self.feedback = ClientFeedback(
            app=ctx.app,
            node=options.node,
            metrics=self.metrics,
            revision_of=self._revision_of,
            built_at=self.pushes.built_at.get,
            report_every=options.status_every,
            pinned=self._pinned,
            refused=lambda: self.etcd.refused.newest,
            refused_before=lambda: self.etcd.refused.cleared,
            restart_pending=self._restart_pending,
            restart_wanted=self._restart_wanted,
            secrets=schema_facts(ctx.schema).secrets,
        )
        # The config files' events, on their way to the engine (``FilesFeed.start``).
        self.files = FilesFeed(
            ctx.config_files,
            lock=self._lock,
            post=self._post,
            broadcast=self.pushes.broadcast,
            feedback=self.feedback,
            started=lambda: self._started,
            early=self._early,
            stopping=self.stopping,
            log=self.log,
        )
        # etcd's events, on their way to the engine (``EtcdIntake.start``), and the etcd
        # values refused.
        self.etcd = EtcdIntake(
            ctx,
            start_timeout=options.etcd_start_timeout,
            lock=self._lock,
            post=self._post,
            dispatch=self._dispatch,
            pushes=self.pushes,
            tail=self.tail,
            files=self.files,
            feedback=self.feedback,
            metrics=self.metrics,
            started=lambda: self._started,
            early=self._early,
            stopping=self.stopping,
            log=self.log,
        )
        self.engine: Engine | None = None
        self.store: StateStore | None = None
        self._abandoned = False
        self.server: SocketServer | None = None
        self.status: StatusPublisher | None = None
        self.guards: GuardManager | None = None
        self.http: MetricsServer | None = None
        self._etcd_at_start = False  # the first etcd snapshot arrived within the start

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        try:
            # Before the start, which may wait for etcd: a SIGHUP or SIGTERM then must not
            # kill the daemon (a reload during the start is taken like any early event).
            signals.install(self.request_stop, self._on_sighup, self.log)
            try:
                await self._start()
            except _StartAbandoned:
                self._abandoned = True
                return 0
            self.ready.set()
            self.log.info(
                "daemon_ready",
                socket=str(self.options.socket_path),
                version=self.engine.version if self.engine else 0,
                etcd=self._etcd_at_start,
            )
            await self.stopping.wait()
        finally:
            await self._stop()
        return 0

    def request_stop(self) -> None:
        self.stopping.set()

    async def _start(self) -> None:
        ctx = self.ctx
        if self.options.metrics_addr:  # bound first: a port in use stops the start cleanly
            self.http = MetricsServer(self.options.metrics_addr, self.metrics, self.health)
        restart_only, secrets = restart_only_keys(ctx.schema), schema_facts(ctx.schema).secrets
        self.server = SocketServer(
            self.options.socket_path,
            self._current,
            on_applied=self.tail.first(self.feedback.on_applied),
            on_metrics=self.tail.first(self.feedback.on_metrics),
            on_disconnect=self.tail.first(self.feedback.on_disconnect, wait=False),
            restart_only=restart_only,
            # Values a process never logs nor reports: of a restart-only key it holds, nor
            # in the text of a callback's or a binding's failure (``hooks``).
            secret=sorted(secrets),
            app=ctx.app,  # a process that asked for another app refuses this daemon's values
        )
        server = self.pushes.server = self.server
        # Both locks before the state is read or written: a daemon that finds either
        # held by another one stops here, and the other's state file stays as it was.
        server.reserve()
        self.store = self._lock_state()
        self.metrics.clients.set_function(lambda: healthz.count_clients(server, watch=False))
        self.metrics.watchers.set_function(lambda: healthz.count_clients(server, watch=True))
        self.engine = Engine(
            schema=ctx.schema,
            app=ctx.app,
            precedence=ctx.precedence,
            layers=[*self.static_layers, files_layer(ctx.schema, [])],  # files: at ``start``
            store=self.store,
            publish=self.pushes.publish,
            broadcast=self.pushes.broadcast,
            on_accepted=self._count_accepted,
            on_rejected=self._on_rejected,
            on_still_refused=self.etcd.on_still_refused,
            on_unchanged=lambda revision: self._post(self._revision_unchanged, revision),
            on_restart_pending=lambda: self._post(self.feedback.daemon_fields_changed),
        )
        engine = self.etcd.engine = self.engine
        # Read at each scrape, as ``/healthz`` reads them: the engine sets the latency once
        # its change is published, after the push (``Pusher.push`` runs within it), and
        # moves its revision without a push for a revision that changed no value in force.
        self.metrics.last_change_latency.set_function(lambda: engine.last_change_seconds)
        self.metrics.revision.set_function(lambda: engine.revision)
        file_state = self.files.start(engine, engine.saved_files(ctx.config_files))
        kvs, revision = await self.etcd.start()
        self._etcd_at_start = ctx.etcd is not None and kvs is not None
        if self.stopping.is_set():
            self.log.info("start_abandoned", reason="stop requested")
            raise _StartAbandoned
        with self._lock:
            self.engine.start(kvs, revision, files=file_state.files)
        self.files.refused_at_start()
        self._started = True
        for replay in self._early:
            replay()
        self._early.clear()
        self.tail.open(asyncio.get_running_loop())
        self.etcd.open_inline()
        await self.server.start()
        if ctx.etcd is not None:
            assert ctx.etcd is not None
            options = ctx.etcd
            self.status = StatusPublisher(
                lambda: EtcdStore(options), ctx.app, self.options.node, ttl=self.options.status_ttl
            )
            self.status.start()
            self.feedback.status = self.status
            self.feedback.start_looking(self.server.sent)
            self.guards = GuardManager(
                app=ctx.app,
                node=self.options.node,
                options=options,
                post=self._post,
                broadcast=self.server.broadcast_event,
                config=lambda: self.engine,
                revision_of=self._revision_of,
                watching=self.feedback.guard_watching,
            )
            self.guards.start()
            self.feedback.guards = self.etcd.guards = self.guards
        if self.http is not None:
            self.http.start()
            # The port chosen, when asked for port 0, is known only from here.
            self.log.info("metrics_listening", host=self.http.host, port=self.http.port)

    def _lock_state(self) -> StateStore:
        """The state file, locked for this daemon's life. Raises ``StateInUse`` if another
        daemon holds it; if the lock cannot be taken at all (the state dir cannot be
        written), the daemon goes on unlocked, as it serves when it cannot save."""
        store = StateStore(self.options.state_dir, self.ctx.app)
        problem = store.lock(f"pid {os.getpid()}, socket {self.options.socket_path}")
        if problem is not None:
            self.log.warning("state_lock_unavailable", path=str(store.lock_path), error=problem)
        return store

    async def _stop(self) -> None:
        deadline = time.monotonic() + 5.0
        self.etcd.close_inline()
        self.feedback.cancel()
        self.pushes.soon.cancel()
        self.etcd.cancel()
        if self.http:
            self.http.stop()
        if self.guards is not None:
            self.guards.stopping()  # the disconnects of the close below are no leaving
        if self.server:
            await self.server.close()
        self.tail.flush()  # what clients sent before they were gone
        loop = asyncio.get_running_loop()
        components = (self.guards, self.status, self.etcd.watcher, self.files.watcher)
        blocking = [w.stop for w in components if w is not None]
        for stop in blocking:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(loop.run_in_executor(None, stop), remaining)
            except TimeoutError:
                self.log.warning("stop_timed_out", component=getattr(stop, "__qualname__", ""))
        self.tail.close(loop)
        if self.engine is not None:
            # Nothing is published any more (the socket is closed, the watchers stopped):
            # the final state is saved now, marked clean.
            with self._lock:
                self.engine.close()
        if self.store is not None:
            self.store.unlock()  # last: the state file is this daemon's until here
        signals.remove()
        if self.ready.is_set() or self._abandoned:  # a failed start says so in its error line
            self.log.info("daemon_stopped")

    # --- signals -------------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        """On the loop: re-read the config files (one re-read at a time: ``Rereads``)."""
        self.log.info("files_reload_requested")
        self.files.reread()

    # --- events from other threads ---------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, fn, args)
        except RuntimeError:
            pass  # the loop closed while a watcher was still stopping

    def _dispatch(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:  # the daemon never dies of one event
            self.log.exception("event_failed", handler=getattr(fn, "__name__", ""), error=str(exc))

    # --- engine and server glue ---------------------------------------------------------------

    def _count_accepted(self, layer: str, version: int) -> None:
        counter = self._accepted_counters.get(layer)
        if counter is None:
            counter = self._accepted_counters[layer] = self.metrics.accepted.labels(layer)
        counter.inc()

    def _restart_pending(self) -> list[str]:
        """The restart-only keys whose new value this daemon holds back from its processes."""
        engine = self.engine
        return sorted(engine.pending_restart) if engine is not None else []

    def _restart_wanted(self) -> Mapping[str, Any]:
        """Their wanted values (``Engine.restart_wanted``)."""
        engine = self.engine
        return engine.restart_wanted if engine is not None else {}

    def _current(self) -> Published:
        assert self.engine is not None and self.engine.current is not None
        return self.engine.current

    def _on_loop(self) -> bool:
        return self._loop_thread in (None, threading.get_ident())

    def _revision_of(self, version: int) -> int | None:
        """The etcd revision whose configuration ``version`` is: the one it was built at,
        or for the version in force, the newest etcd revision taken without a change of
        values (an edit of a value already in force, or of a key a higher layer holds)."""
        engine = self.engine
        if engine is not None and version == engine.version:
            return engine.revision
        return self.pushes.built_at.get(version)

    def _pinned(self) -> dict[str, str]:
        """The keys a layer above etcd holds here (env, ``--set``), with that layer: an etcd
        edit of them takes no effect on this daemon. In status entries, so that ``set``,
        run elsewhere, can say so."""
        engine = self.engine
        snapshot = engine.snapshot if engine is not None else None
        if engine is None or snapshot is None:
            return {}
        # The keys those layers give themselves, not the sources of the leaves: of a
        # mapping, the source is the highest layer that gave any key inside it, and an env
        # variable for ``weights.tail`` holds that key, not the etcd value of ``weights``.
        pinned: dict[str, str] = {}
        for name in engine.precedence[engine.precedence.index("etcd") + 1 :]:  # highest last
            pinned.update(dict.fromkeys(snapshot.layers.get(name, ()), name))
        return pinned

    def _on_rejected(self, layer: str, revision: int, reason: str, keys: tuple[str, ...]) -> None:
        """From the engine, on the loop or the watch thread (a lone change), under
        ``_lock``: ``keys``, the keys the change edited, keep the values in force."""
        self.metrics.rejected.labels(layer).inc()
        if layer == "etcd" and revision:
            self.etcd.on_rejected(revision, reason, keys)
        # A files refusal: ``FilesFeed`` says what is refused once the edit is taken apart.

    def _revision_unchanged(self, revision: int) -> None:
        """On the loop: etcd's revision ``revision`` changed no value in force; the
        processes running the state in force run its configuration."""
        self.feedback.on_revision_unchanged()
        if self.guards is not None:
            self.guards.on_revision_unchanged(revision)

    def health(self) -> dict[str, Any]:
        """For ``/healthz`` (the HTTP thread): ``healthz.answer``."""
        return healthz.answer(
            engine=self.engine,
            server=self.server,
            loop=self._loop,
            on_loop=self._on_loop(),
            ready=self.ready,
            etcd=self.etcd if self.ctx.etcd else None,
            feedback=self.feedback,
            log=self.log,
        )


def run_daemon(ctx: Context, layers: list[Layer], options: DaemonOptions) -> int:
    """Run a daemon on this thread until SIGTERM/SIGINT; raise HotknobError for bad start input."""
    return asyncio.run(Daemon(ctx, layers, options).run())


def socket_path_for(app: str, explicit: str | None) -> Path:
    return Path(explicit) if explicit else default_socket_path(app)
