"""Publishing what each connected process applied to etcd, on a lease, so dead ones vanish.

Entries live at ``/hotknob/<app>/status/<node>/<client>`` as JSON: what the process
applied and reports (version, revision, step, time, pid, rank, errors, metrics), the
guards watching it (guards), and what its daemon says of itself (pinned: the keys env
or ``--set`` hold there; rejected: an etcd revision it refused, and runs without;
rejected_before: the refusals it has cleared since, by key, for ``set --wait``;
config_files: what is wrong with its files; see ``feedback.py``). All writes happen on this
publisher's own thread: the event loop only drops the newest entry per
client into a dict, so a slow or absent etcd never delays a change. The
lease is kept alive every ``ttl / 3`` and re-granted if etcd lost it; on
stop the lease is revoked, which removes every entry of this daemon at once. A process
that leaves has its entry deleted only while it is on this daemon's lease: two daemons of
one app with one node name write a process of one name at one key (``status_entry_shared``
warns of it), and the one whose process left must not delete the other's.

One entry that etcd refuses (too large for its request limit) must not hold back
the others: an entry over ``MAX_ENTRY_BYTES`` is written without its ``metrics``
and ``errors``, and one etcd still refuses is skipped with a warning (once, until
that key is written again), while the rest of the batch goes on.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, TypeGuard

from hotknob.config import HotknobError, InvalidInput
from hotknob.config.keys import status_prefix

from .etcd_store import EtcdStore
from .etcd_types import TooLargeError
from .logs import get_logger

_DELETE = object()

WARN_EVERY_S = 60.0
"""While etcd stays unreachable the publisher retries every second, but says so only on the
first failure and then at most this often (with the count), and once when it recovers."""

MAX_ENTRY_BYTES = 1024 * 1024
"""The largest entry written whole: etcd refuses a request over 1.5 MiB by default."""

_SHED = ("metrics", "errors")
"""What an oversized entry is written without (listed in its ``left_out``): the parts that
grow with what its client sends."""


def status_name(node: str, client: str) -> str:
    """A process's name under the status prefix, ``<node>/<client>``: a ``/`` in the client's
    name is written ``_``, so that the name is one level below the node's.

    The baselines a guarded ``set`` stores are keyed by it, so guards look them up by it.
    """
    return f"{node}/{client.replace('/', '_')}"


class StatusPublisher:
    def __init__(
        self,
        store_factory: Callable[[], EtcdStore],
        app: str,
        node: str,
        *,
        ttl: int = 10,
    ):
        self._store_factory = store_factory
        self._app = app
        self.node = node
        self.prefix = f"{status_prefix(app)}{node}/"
        self.ttl = ttl
        self._pending: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hotknob-status", daemon=True)
        self._store: EtcdStore | None = None
        self._lease: int | None = None
        self._current: dict[str, dict[str, Any]] = {}
        self._failures = 0
        self._warned_at = float("-inf")
        self._refused: set[str] = set()  # keys whose entry etcd refused, until written again
        self._shared: set[str] = set()  # keys found holding another daemon's process
        self.log = get_logger("hotknob.status", node=node)

    def key(self, client: str) -> str:
        return status_prefix(self._app) + status_name(self.node, client)

    def start(self) -> None:
        self._thread.start()

    def publish(self, client: str, entry: Mapping[str, Any]) -> None:
        with self._cond:
            self._pending[self.key(client)] = dict(entry)
            self._cond.notify()

    def remove(self, client: str) -> None:
        with self._cond:
            self._pending[self.key(client)] = _DELETE
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        next_keepalive = 0.0
        while True:
            with self._cond:
                timeout = max(0.0, next_keepalive - time.monotonic())
                if not self._pending and not self._stopping:
                    self._cond.wait(timeout=timeout)
                if self._stopping:
                    break
                batch, self._pending = self._pending, {}
            try:
                store = self._connect()
                for key, entry in batch.items():
                    if entry is _DELETE:
                        self._current.pop(key, None)
                    else:
                        self._current[key] = entry
                if time.monotonic() >= next_keepalive:
                    if self._keepalive(store):
                        batch = dict(self._current)  # a new lease: every entry is written again
                    next_keepalive = time.monotonic() + self.ttl / 3
                for key, entry in batch.items():
                    if entry is _DELETE:
                        # Only its own: another daemon of this app and node may have
                        # written a process of the same name there since.
                        store.delete_on_lease(key, self._lease)
                        self._refused.discard(key)
                    else:
                        self._put(store, key, entry)
                self._succeeded()
            except (HotknobError, OSError, ValueError) as exc:
                self._failed(exc)
                self._drop_store()
                with self._cond:
                    # Keep what could not be written, unless something newer arrived.
                    for key, entry in batch.items():
                        self._pending.setdefault(key, entry)
                    self._cond.wait(timeout=1.0)
                next_keepalive = 0.0
        self._shutdown()

    def _put(self, store: EtcdStore, key: str, entry: Mapping[str, Any]) -> None:
        """Write one entry. etcd refusing it (``InvalidInput``: too large for its request
        limit; ``TooLargeError``: over its gRPC message limit) is this entry's problem, not
        etcd's: it is written without its large parts, or else skipped, with a warning,
        and the batch goes on. An unreachable etcd still fails the batch, to be retried."""
        try:
            whole = json.dumps(entry, allow_nan=False)
        except ValueError as exc:  # not JSON: retrying would fail the same way, every second
            self._refuse(key, "status_entry_skipped", reason=str(exc))
            return
        reason = f"{len(whole)} bytes, over {MAX_ENTRY_BYTES}"
        for text in self._candidates(entry, whole):
            try:
                before = store.put_on_lease(key, text, self._lease)
            except (InvalidInput, TooLargeError) as exc:
                reason = str(exc)
                continue
            self._note_shared(key, before, entry)
            if text is whole:
                self._refused.discard(key)
            else:
                self._refuse(key, "status_entry_trimmed", bytes=len(whole), reason=reason)
            return
        self._refuse(key, "status_entry_skipped", bytes=len(whole), reason=reason)

    @staticmethod
    def _candidates(entry: Mapping[str, Any], whole: str) -> Iterator[str]:
        """What to try to write for ``entry``: whole if not too large, then without the
        parts that grow with what its client sends (made only if needed)."""
        if len(whole) <= MAX_ENTRY_BYTES:
            yield whole
        left_out = [name for name in _SHED if name in entry]
        if left_out:
            rest = {k: v for k, v in entry.items() if k not in left_out}
            yield json.dumps({**rest, "left_out": left_out}, allow_nan=False)

    def _note_shared(self, key: str, before: bytes | None, entry: Mapping[str, Any]) -> None:
        """Warn, once per key, when ``key`` held another process's entry on another
        daemon's lease: two daemons of one app share this node name (two on one host,
        where ``--node`` defaults to its name), each with a process of this name. Their
        entries overwrite each other, and ``status`` and ``set --wait`` see one process
        where two run. The same process come back (its daemon restarted) is no such case."""
        if before is None or key in self._shared:
            return
        try:
            other = json.loads(before)
        except ValueError:
            return
        if not isinstance(other, dict) or other.get("pid") == entry.get("pid"):
            return
        self._shared.add(key)
        self.log.warning(
            "status_entry_shared",
            key=key,
            pid=entry.get("pid"),
            other_pid=other.get("pid"),
            reason=(
                "another daemon of this app and node name (or one stopped less than "
                f"{self.ttl} s ago) has a process of the same name: their status entries "
                "overwrite each other; give each daemon on a host its own --node"
            ),
        )

    def _refuse(self, key: str, event: str, **fields: Any) -> None:
        """Warn about ``key``'s entry once, until it is written whole again (a client
        whose reports stay too large would otherwise bring one warning a second)."""
        if key not in self._refused:
            self._refused.add(key)
            self.log.warning(event, key=key, **fields)

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        now = time.monotonic()
        if self._failures == 1 or now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            self.log.warning(
                "status_publish_failed", error=str(exc), failures=self._failures, retry_s=1.0
            )

    def _succeeded(self) -> None:
        if self._failures:
            self.log.info("status_publish_recovered", failures=self._failures)
            self._failures = 0
            self._warned_at = float("-inf")

    def _connect(self) -> EtcdStore:
        if self._store is None:
            self._store = self._store_factory()
            self._lease = None
        return self._store

    def _keepalive(self, store: EtcdStore) -> bool:
        """Refresh the lease; True if a new one had to be granted."""
        if self._lease is not None and store.keepalive(self._lease):
            return False
        self._lease = store.grant_lease(self.ttl)
        return True

    def _drop_store(self) -> None:
        if self._store is not None:
            try:
                self._store.close()
            except Exception:
                pass
        self._store = None

    def _shutdown(self) -> None:
        if self._store is not None and self._lease is not None:
            try:
                self._store.revoke(self._lease)
            except HotknobError as exc:
                self.log.warning("lease_revoke_failed", error=str(exc))
        self._drop_store()


def _others(
    kvs: Mapping[str, bytes], prefix: str, node: str, mine: Collection[str] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The status entries under ``prefix`` of other daemons' processes, by name
    (``<node>/<client>``), decoded; this daemon's own are left out (it knows them exactly).

    Its own are those of ``mine`` (the names of its connected processes) where given, else
    those of its ``node``. Two daemons of one app may share a node name (two on one host,
    where ``--node`` defaults to the host's name): each that took the other's processes
    for its own passed a guard while a process of the other was still inside its window."""
    for key, raw in sorted(kvs.items()):
        name = key[len(prefix) :]
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        owner = entry.get("node")
        if mine is not None:
            if name in mine:
                continue
        elif owner == node or (not isinstance(owner, str) and name.startswith(node + "/")):
            continue
        yield name, entry


def remote_open_windows(
    kvs: Mapping[str, bytes],
    prefix: str,
    node: str,
    guard_id: str,
    revision: int,
    keys: Collection[str] = (),
    mine: Collection[str] | None = None,
) -> tuple[list[str], list[str]]:
    """The processes of other daemons (status entries under ``prefix``) whose window of
    guard ``guard_id`` (guarding ``revision``, a change of the dotted ``keys``) is not
    done, as their own daemon says in their entry (``GuardManager.windows_of``), by name
    (``<node>/<client>``): those that reported what the guard reads since the change
    reached them (still inside their window), and those that have not yet.

    The second list also has the processes whose entry shows no window of the guard yet,
    unless they will never apply the change (``never_applies``: their daemon refused it,
    or holds every one of its keys in a layer above etcd) or run it already
    (``unchanged_by``: it altered no value in force there): the change may not have
    reached them, or their daemon not yet published the window (the change and the
    guard's record come on two watches, and a loaded machine publishes late). The
    caller waits only for those the guard expects to hear from
    (``ArmedGuard.awaited_remote``), and for a while: without them, a guard passed on
    this daemon's processes within a tenth of a second while another node's process, 50
    times the loss, had not been heard of yet. ``mine``: this daemon's processes, by
    name (``_others``)."""
    inside: list[str] = []
    unheard: list[str] = []
    for name, entry in _others(kvs, prefix, node, mine):
        windows = entry.get("guards")
        window = windows.get(guard_id) if isinstance(windows, dict) else None
        if window is None:
            if not never_applies(entry, revision, keys) and not unchanged_by(entry, revision):
                unheard.append(name)
            continue
        if not isinstance(window, dict) or window.get("done") is True:
            continue  # done on its daemon
        (inside if window.get("reported") is True else unheard).append(name)
    return inside, unheard


def refusal(rejected: Any, revision: int) -> Mapping[str, Any] | None:
    """A status entry's ``rejected`` field, if it is of etcd's ``revision`` or later: its
    daemon refused that change, or one after it, and runs without it now. Its refusals
    cleared since (``rejected_before``) do not count here: the guards ask whether a
    process will still apply a state at the change or past it, and one whose daemon took
    a later revision of the refused keys will (its guard watches it from then on)."""
    if isinstance(rejected, Mapping) and is_int(rejected.get("revision")):
        return rejected if rejected["revision"] >= revision else None
    return None


def never_applies(entry: Mapping[str, Any], revision: int, keys: Collection[str] = ()) -> bool:
    """Whether ``entry``'s process will never apply the change of the dotted ``keys`` at
    etcd's ``revision``, as its daemon says: it refused that revision or a later one
    (``rejected``), or a layer above etcd (env, ``--set``) holds every one of the keys
    there (``pinned``), so that no state comes for it."""
    if refusal(entry.get("rejected"), revision) is not None:
        return True
    pinned = entry.get("pinned")
    return (
        bool(keys)
        and isinstance(pinned, Mapping)
        and all(pinned_by(pinned, k) is not None for k in keys)
    )


def pinned_by(pinned: Mapping[str, Any], key: str) -> str | None:
    """The layer above etcd that holds ``key`` on a daemon, as its processes' ``pinned``
    says: one that gives the key itself or a value it lies inside (``weights`` given whole
    holds ``weights.head``); None if none does, or the entry says no layer."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        layer = pinned.get(".".join(parts[:end]))
        if layer is not None:
            return layer if isinstance(layer, str) else None
    return None


def unchanged_by(entry: Mapping[str, Any], revision: int) -> bool:
    """Whether etcd's ``revision`` altered no value in force for ``entry``'s process, as its
    daemon says: the process runs that revision's configuration (``revision``) with a
    state built before it (``built``), so no new state comes for it. A daemon restarted
    since builds a new state: its processes are waited for until it arms the guard."""
    applied, built = entry.get("revision"), entry.get("built")
    return is_int(applied) and is_int(built) and built < revision <= applied


def remote_watching(
    kvs: Mapping[str, bytes],
    prefix: str,
    node: str,
    guard_id: str,
    revision: int,
    keys: Collection[str] = (),
    mine: Collection[str] | None = None,
) -> list[str]:
    """The processes of other daemons (status entries under ``prefix``) that may still
    judge guard ``guard_id`` (guarding revision ``revision``, a change of the dotted
    ``keys``), by name: watched by it on their daemon (their entry lists it, done or not:
    their daemon ends it), or not yet at the change (their entry's revision is below it:
    they may apply it at their next step), unless they never will (``never_applies``).
    While there are any, this daemon does not end the guard as abandoned. One whose
    window its daemon calls ``unjudged`` (past its end with no report of what the guard
    reads) cannot judge it: left out, or two daemons whose processes are all so would
    each leave the guard to the other. ``mine``: this daemon's processes (``_others``)."""
    found = []
    for name, entry in _others(kvs, prefix, node, mine):
        window = _window(entry, guard_id)
        applied = entry.get("revision")
        if (window is not None and window.get("unjudged") is not True) or (
            is_int(applied) and applied < revision and not never_applies(entry, revision, keys)
        ):
            found.append(name)
    return found


def remote_unjudged(
    kvs: Mapping[str, bytes],
    prefix: str,
    node: str,
    guard_id: str,
    mine: Collection[str] | None = None,
) -> list[str]:
    """The processes of other daemons whose window of guard ``guard_id`` their daemon calls
    ``unjudged`` in their entry, by name: an ending's outcome names them. ``mine``: this
    daemon's processes (``_others``)."""
    return [
        name
        for name, entry in _others(kvs, prefix, node, mine)
        if (window := _window(entry, guard_id)) is not None and window.get("unjudged") is True
    ]


def _window(entry: Mapping[str, Any], guard_id: str) -> Mapping[str, Any] | None:
    """What ``entry`` says of its process's window of guard ``guard_id``, if anything."""
    windows = entry.get("guards")
    window = windows.get(guard_id) if isinstance(windows, dict) else None
    return window if isinstance(window, dict) else None


def refused_here(
    kvs: Mapping[str, bytes], prefix: str, node: str, clients: Collection[str], revision: int
) -> set[str]:
    """Those of ``clients``, processes of daemon ``node``, whose status entry under
    ``prefix`` says that their daemon refused etcd's ``revision`` or a later one. A
    daemon's guards learn of its own refusals only so, from what it published."""
    found = set()
    for client in clients:
        raw = kvs.get(prefix + status_name(node, client))
        try:
            entry = json.loads(raw) if raw is not None else None
        except ValueError:
            continue
        if isinstance(entry, dict) and never_applies(entry, revision):
            found.add(client)
    return found


def waiting_for_restart(entry: Mapping[str, Any]) -> set[str]:
    """The restart-only keys ``entry``'s process runs as it started, their new value waiting
    for a restart: held back by its daemon (``restart_pending``) or by the process
    itself (``held``, after its daemon restarted alone). Its daemon lists neither for a
    key the process runs at the value wanted (``feedback.ClientFeedback._waiting``)."""
    return {
        str(key)
        for name in ("restart_pending", "held")
        if isinstance(entry.get(name), list)
        for key in entry[name]
    }


def agreed_rank(entry: Mapping[str, Any]) -> int | None:
    """The rank whose values ``entry``'s process runs in place of its daemon's (``agreed``:
    the ranks of a torch.distributed group agreed on them, and its daemon holds others at
    that etcd revision), if it said so in its ack."""
    agreed = entry.get("agreed")
    rank = agreed.get("rank") if isinstance(agreed, Mapping) else None
    return rank if is_int(rank) else None


def agreed_text(rank: int) -> str:
    """What ``status`` and ``set --wait`` say of a process that runs rank ``rank``'s values
    (``agreed_rank``)."""
    why = "its daemon's differ: node-local layers differ?"
    return f"runs the values agreed with rank {rank} ({why})"


def is_int(value: Any) -> TypeGuard[int]:
    """An integer field of a status entry (written by anyone: ``true`` is no integer)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_time(value: Any) -> TypeGuard[int | float]:
    """A time field of a status entry (seconds since the epoch): a finite number."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
