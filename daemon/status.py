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

What the entries say is read back, by others than this publisher, in ``status_entries.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from hotknob.config import HotknobError, InvalidInput
from hotknob.config.keys import status_prefix

from .etcd_store import EtcdStore
from .etcd_types import TooLargeError
from .logs import get_logger
from .status_entries import status_name

_DELETE = object()

WARN_EVERY_S = 60.0
"""While etcd stays unreachable the publisher retries every second, but says so only on the
first failure and then at most this often (with the count), and once when it recovers."""

MAX_ENTRY_BYTES = 1024 * 1024
"""The largest entry written whole: etcd refuses a request over 1.5 MiB by default."""

_SHED = ("metrics", "errors")
"""What an oversized entry is written without (listed in its ``left_out``): the parts that
grow with what its client sends."""


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
