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
itself (``_take_inline``), without that hop. Either way the engine and the push
state (``push.Pusher``) are used under ``_lock``. The rest of that change's work runs
a little later, once the clients applied it, and what they send meanwhile waits for it
(``held_tail.HeldTail``). The config files' events reach the engine on their own path
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotknob.config import Layer, files_layer, restart_only_keys
from hotknob.config.schema_facts import schema_facts
from hotknob.model_runtime.protocol import default_socket_path

from . import signals
from .context import Context
from .engine import Engine
from .etcd_feed import EtcdFeed
from .etcd_store import EtcdChange, EtcdStore
from .etcd_watcher import EtcdWatcher
from .feedback import ClientFeedback
from .files_feed import FilesFeed
from .guards import GuardManager
from .held_tail import HeldTail
from .logs import get_logger
from .metrics import Metrics, MetricsServer
from .published import Published
from .push import Pusher
from .refused import RefusedKeys
from .reports import REPORT_STATUS_EVERY_S
from .socket_server import SocketServer
from .state import StateStore
from .status import StatusPublisher

PUSH_EVERY_S = 0.002

LOOP_ANSWER_S = 2.0
"""How long ``/healthz`` waits for the event loop to run a no-op. A loop that cannot
within this is blocked (a handler stuck or looping): it serves its processes nothing,
so the daemon is not ok, and a liveness probe restarts it. Below the timeouts of the
readiness and liveness probes in deploy/kubernetes/job.yaml and of the image's
HEALTHCHECK (3 s and more)."""


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
        self._initial_etcd: tuple[Mapping[str, bytes], int] | None = None
        self._initial_event = asyncio.Event()
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
        self._inline_ok = False  # started, early events replayed, not stopping
        # Changes and full reads from the etcd watch thread, to the engine in group commits
        # (or, for a change that comes alone, on the watch thread itself).
        self._etcd_feed = EtcdFeed(
            self._post,
            self._on_etcd_changes,
            self._on_etcd_snapshot,
            guard=self._dispatch,
            inline=self._take_inline,
        )
        self._accepted_counters: dict[str, Any] = {}
        self._changes_inline = self.metrics.etcd_changes.labels("watch_thread")
        self._changes_in_loop = self.metrics.etcd_changes.labels("loop")
        self.refused = RefusedKeys(ctx.app)  # etcd values refused: under ``_lock``
        # A group's changes, those from ``_untaken_from`` on not taken yet: under ``_lock``.
        self._untaken: list[EtcdChange] = []
        self._untaken_from = 0
        self.feedback = ClientFeedback(
            app=ctx.app,
            node=options.node,
            metrics=self.metrics,
            revision_of=self._revision_of,
            built_at=self.pushes.built_at.get,
            report_every=options.status_every,
            pinned=self._pinned,
            refused=lambda: self.refused.newest,
            refused_before=lambda: self.refused.cleared,
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
        self.engine: Engine | None = None
        self.store: StateStore | None = None
        self._abandoned = False
        self.server: SocketServer | None = None
        self.etcd: EtcdWatcher | None = None
        self.status: StatusPublisher | None = None
        self.guards: GuardManager | None = None
        self.http: MetricsServer | None = None
        self.etcd_connected = False
        # Set when the watcher reports etcd lost (also before the first connection, when
        # etcd is down at start): only coming back after that is a resume.
        self._etcd_lost = False
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
        self.metrics.clients.set_function(lambda: _count(server, watch=False))
        self.metrics.watchers.set_function(lambda: _count(server, watch=True))
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
            on_still_refused=self._on_still_refused,
            on_unchanged=lambda revision: self._post(self._revision_unchanged, revision),
            on_restart_pending=lambda: self._post(self.feedback.daemon_fields_changed),
        )
        engine = self.engine
        # Read at each scrape, as ``/healthz`` reads them: the engine sets the latency once
        # its change is published, after the push (``Pusher.push`` runs within it), and
        # moves its revision without a push for a revision that changed no value in force.
        self.metrics.last_change_latency.set_function(lambda: engine.last_change_seconds)
        self.metrics.revision.set_function(lambda: engine.revision)
        file_state = self.files.start(engine, engine.saved_files(ctx.config_files))
        kvs, revision = await self._start_etcd()
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
        self._inline_ok = True
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
            self.feedback.guards = self.guards
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

    async def _start_etcd(self) -> tuple[Mapping[str, bytes] | None, int]:
        if self.ctx.etcd is None:
            self.log.info("etcd_disabled", reason="no --etcd-endpoints")
            return {}, 0
        self.etcd = EtcdWatcher(
            self.ctx.etcd,
            self.ctx.prefix,
            on_snapshot=lambda kvs, rev: self._etcd_feed.put((kvs, rev)),
            on_change=self._etcd_feed.put,
            on_connection=lambda up, detail: self._post(self._on_etcd_connection, up, detail),
        )
        self.etcd.start()
        # Until the first read, the timeout, or a stop asked for (then the start ends).
        waits = [asyncio.ensure_future(e.wait()) for e in (self._initial_event, self.stopping)]
        try:
            await asyncio.wait(
                waits, timeout=self.options.etcd_start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for wait in waits:
                wait.cancel()
        if self.stopping.is_set():
            return None, 0
        if self._initial_etcd is None:
            self.log.warning(
                "etcd_unavailable_at_start",
                endpoints=",".join(self.ctx.etcd.endpoints),
                waited_s=self.options.etcd_start_timeout,
            )
            return None, 0
        assert self._initial_etcd is not None
        kvs, revision = self._initial_etcd
        self._initial_etcd = None
        return kvs, revision

    async def _stop(self) -> None:
        deadline = time.monotonic() + 5.0
        self._inline_ok = False
        self.feedback.cancel()
        self.pushes.soon.cancel()
        self._etcd_feed.cancel()
        if self.http:
            self.http.stop()
        if self.guards is not None:
            self.guards.stopping()  # the disconnects of the close below are no leaving
        if self.server:
            await self.server.close()
        self.tail.flush()  # what clients sent before they were gone
        loop = asyncio.get_running_loop()
        components = (self.guards, self.status, self.etcd, self.files.watcher)
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

    def _on_etcd_snapshot(self, kvs: Mapping[str, bytes], revision: int) -> None:
        if not self._started:
            self._initial_etcd = (kvs, revision)
            self._initial_event.set()
            return
        assert self.engine is not None
        with self._lock:
            before = self.refused.newest, self.refused.cleared
            # What the read refuses is said again as it is read, at its revision; the
            # refusals cleared before stay, unless the read is below them (a restore).
            self.refused.clear(revision)
            self.engine.on_etcd_snapshot(kvs, revision)
            if (self.refused.newest, self.refused.cleared) != before:
                self._post(self.feedback.refusals_changed)
            self.files.again()
        self._guarded_keys_read_again()

    def _on_etcd_changes(self, changes: Iterable[EtcdChange]) -> None:
        if not self._started:
            early = list(changes)
            self._early.append(lambda: self._on_etcd_changes(early))
            return
        assert self.engine is not None
        changes = list(changes)
        with self._lock:
            # A group's refusals are reported after its push, all of them, in order
            # (``_on_rejected``): each takes the changes before it first (``_untaken``),
            # and the rest are taken here, after the engine had them.
            self._untaken, self._untaken_from = changes, 0
            try:
                self.engine.on_etcd_changes(_counted(changes, self._changes_in_loop))
                untaken = changes[self._untaken_from :]
            finally:
                self._untaken, self._untaken_from = [], 0
            self._took(untaken)
            self.files.again()
        self._guarded_keys_written(changes)

    def _guarded_keys_written(self, changes: list[EtcdChange]) -> None:
        """After etcd changes: a guard whose keys they wrote ends now (``on_config_changes``),
        on the loop. Nothing to do, at the cost of one look-up, while no guard is armed."""
        guards = self.guards
        if guards is not None and guards.armed:
            self._post(guards.on_config_changes, changes)

    def _guarded_keys_read_again(self) -> None:
        """After a full read of etcd (its watch broke, the history it missed compacted): a
        write of guarded keys that came in it reached no ``on_config_changes``, so each
        armed guard reads their mod revisions (``on_full_read``). One look-up while none is."""
        guards = self.guards
        if guards is not None and guards.armed:
            self._post(guards.on_full_read)

    def _take_inline(self, change: EtcdChange) -> bool:
        """A lone etcd change, on the watch thread: accept or reject it and push it here.

        Declined (False: the loop takes it, in order) until the daemon has started and
        replayed what came early, and while a push is due on the loop: a state the loop
        is holding back must not be overtaken."""
        if not self._inline_ok:
            return False
        with self._lock:
            if not self._inline_ok or self.pushes.due is not None or not self.pushes.soon.idle():
                return False
            self._dispatch(self._on_lone_etcd_change, (change,))
            if self.tail.later():
                return True
        self.tail.wait_and_finish()
        return True

    def _on_lone_etcd_change(self, change: EtcdChange) -> None:
        assert self.engine is not None
        # Before the push, whose acks the loop may take before this returns: the keys the
        # change edits run what etcd says, unless the engine rejects it (which refuses
        # them again, at this revision). Under ``_lock`` (``_take_inline``).
        if self.refused:
            self._took((change,))
        try:  # not a group: the engine may push it with the least work first
            self.engine.on_etcd_change(change.revision, change.puts, change.deletes, hold_tail=True)
        finally:
            self._changes_inline.inc()
        self.files.again()
        self._guarded_keys_written([change])

    def _took(self, changes: Iterable[EtcdChange]) -> None:
        """The keys each of ``changes`` edited run what etcd says now, unless the engine
        rejected that change (``RefusedKeys.taken``). On the loop, after the engine had
        them (a group's acks come after), each before a later one's refusal (see
        ``_on_rejected``); on the watch thread, before (see above)."""
        changed = False
        for change in changes:
            if not self.refused:
                break  # nothing held (the common case), or nothing left to clear
            changed |= self.refused.taken(change.revision, [*change.puts, *change.deletes])
        if changed:
            self._post(self.feedback.refusals_changed)

    def _on_etcd_connection(self, up: bool, detail: str) -> None:
        """The watcher's transitions. Its first ``up`` (whenever the start's read and
        watch succeed) is no resume: only one after a reported loss is counted."""
        was = self.etcd_connected
        self.etcd_connected = up
        self.metrics.etcd_connected.set(1 if up else 0)
        if up and not was and self._etcd_lost:
            self._etcd_lost = False
            self.metrics.watch_resumes.inc()
            self.log.info("etcd_reconnected", detail=detail)
        elif not up:
            self._etcd_lost = True
            if was:
                self.log.warning("etcd_disconnected", detail=detail)

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
            # In a group, the revisions before this one are taken first: one that took a
            # key this one refuses again ends the run of refusals before (0.9 taken, then
            # 1.6 refused, in one group), which would otherwise go on through it, as if
            # this daemon had refused 0.9 too (``RefusedKeys``).
            untaken, start = self._untaken, self._untaken_from
            end = start
            while end < len(untaken) and untaken[end].revision < revision:
                end += 1
            if end > start:
                self._untaken_from = end
                self._took(untaken[start:end])
            if self.refused.refused(revision, reason, keys):
                self._post(self.feedback.refusals_changed)
        # A files refusal: ``FilesFeed`` says what is refused once the edit is taken apart.

    def _on_still_refused(self, revision: int, reason: str, keys: tuple[str, ...]) -> None:
        """From the engine, under ``_lock``: a full read refused again etcd values this
        daemon refused and reported before, unchanged since. No new rejection (neither
        counted nor reported), but they stay refused: the status entries and ``/healthz``
        say so as before the read."""
        if self.refused.refused(revision, reason, keys):
            self._post(self.feedback.refusals_changed)

    def _revision_unchanged(self, revision: int) -> None:
        """On the loop: etcd's revision ``revision`` changed no value in force; the
        processes running the state in force run its configuration."""
        self.feedback.on_revision_unchanged()
        if self.guards is not None:
            self.guards.on_revision_unchanged(revision)

    def health(self) -> dict[str, Any]:
        """For ``/healthz`` (the HTTP thread). Not ok before the first snapshot is in force,
        nor once the socket path no longer leads to the socket this daemon bound (removed
        or replaced), nor while the event loop does not answer (``loop``: ``blocked``):
        processes cannot be served then, though the process still runs and this thread
        still answers."""
        engine = self.engine
        server = self.server
        socket_file = server.socket_file() if server else "not_listening"
        loop = _loop_state(self._loop, self._on_loop())
        if loop == "blocked":
            self.log.warning("event_loop_blocked", waited_s=LOOP_ANSWER_S)
        ready = self.ready.is_set() and engine and engine.current
        return {
            "ok": bool(ready and socket_file == "ok" and loop == "ok"),
            "socket": socket_file,
            "loop": loop,
            "version": engine.version if engine else 0,
            "revision": engine.revision if engine else 0,
            "etcd_connected": self.etcd_connected if self.ctx.etcd else None,
            "clients": _count(server, watch=False),
            "watchers": _count(server, watch=True),
            "pending_restart": dict(engine.pending_restart) if engine else {},
            "state_write_error": engine.state_write_error if engine else None,
            # Refused, while the last good state stays in force: not a fault of the daemon.
            "rejected": self.feedback.rejected,
            "config_files": self.feedback.config_files,
        }


def _loop_state(loop: asyncio.AbstractEventLoop | None, on_loop: bool) -> str:
    """``ok`` if the event loop runs a no-op within ``LOOP_ANSWER_S`` (at once when asked
    from the loop itself), ``blocked`` if it does not, ``not_running`` before it starts
    and once it has closed."""
    if loop is None or loop.is_closed():
        return "not_running"
    if on_loop:
        return "ok"
    answered = threading.Event()
    try:
        loop.call_soon_threadsafe(answered.set)
    except RuntimeError:  # closed since the check above: the daemon is stopping
        return "not_running"
    return "ok" if answered.wait(LOOP_ANSWER_S) else "blocked"


def _count(server: SocketServer | None, *, watch: bool) -> int:
    """Connected clients that said ``hello``: processes, or ``watch`` sessions."""
    if server is None:
        return 0
    return sum(1 for client in server.clients if client.watch is watch)


def _counted(
    changes: Iterable[EtcdChange], counter: Any
) -> Iterator[tuple[int, Mapping[str, bytes], Iterable[str]]]:
    """The engine's form of each change, counted as the engine takes it (a group is lazy)."""
    for change in changes:
        counter.inc()
        yield change.revision, change.puts, change.deletes


def run_daemon(ctx: Context, layers: list[Layer], options: DaemonOptions) -> int:
    """Run a daemon on this thread until SIGTERM/SIGINT; raise HotknobError for bad start input."""
    return asyncio.run(Daemon(ctx, layers, options).run())


def socket_path_for(app: str, explicit: str | None) -> Path:
    return Path(explicit) if explicit else default_socket_path(app)
