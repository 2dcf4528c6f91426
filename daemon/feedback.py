"""What clients say back: ``applied`` acks and ``metrics`` reports, to status, guards and
Prometheus.

Each ack and report makes its process's status entry; when the entry goes to the
status publisher (at most every ``STATUS_EVERY_S`` after acks, every ``report_every``
for what a report alone changes) is ``status_pacing.py``'s to say. Guards and Prometheus
see every report as it comes. All on the event loop; the status publisher and the guards
are set once the daemon has started them.

A process that neither acks nor reports after it connects (one whose daemon restarted
while a value changed: it acks the new snapshot only at its next ``apply``, a minute
later in a long step) still gets an entry, from the looks for states held unapplied
(``pending.py``): once it has held its first state unapplied at two looks in a row, an
entry with no version or revision and its ``pending`` field, so that ``status`` lists
it and ``set --wait`` waits for it. One write per such connection; a process that acks
its snapshot at once writes nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hotknob.config.secrecy import hides
from hotknob.model_runtime import protocol

from .guards import GuardManager
from .logs import get_logger
from .metrics import Metrics
from .pending import CHECK_EVERY_S, PendingStates, Sent
from .published import ClientInfo
from .refused import REASON_CHARS
from .reports import (
    MAX_METRICS,
    MAX_NAME_CHARS,
    REPORT_STATUS_EVERY_S,
    ClientReports,
    decode_report,
)
from .status import StatusPublisher
from .status_entries import is_int
from .status_pacing import StatusPacing
from .table import cut

# What an entry says of its daemon (``_daemon_fields``).
# ``held``, the process's, is among them: which of its keys wait for a restart changes with
# the value its daemon wants (``_waiting``).
_DAEMON_FIELDS = (
    "pinned",
    "rejected",
    "rejected_before",
    "config_files",
    "restart_pending",
    "held",
)


def _shown_errors(errors: list[dict[str, str]], secrets: frozenset[str]) -> list[dict[str, str]]:
    """An ack's ``errors`` as the status entry (etcd, ``status``) may show them: the message
    of an error about a key the schema keeps secret (``hides``) is withheld, as a
    validator's is, since it may quote the value (an ``on_change`` callback's ``auth
    failed for key ...``); its exception type (``RuntimeError: ...``) is kept."""
    shown = []
    for error in errors:
        key = error.get("key")
        if key is not None and "error" in error and hides(key, secrets):
            kind = error["error"].split(":", 1)[0]
            said = f"{kind} " if kind.replace(".", "").isidentifier() else ""
            error = {**error, "error": f"{said}(its message is withheld for a secret key)"}
        shown.append(error)
    return shown


class ClientFeedback:
    def __init__(
        self,
        *,
        app: str,
        node: str,
        metrics: Metrics,
        revision_of: Callable[[int], int | None],
        built_at: Callable[[int], int | None] = lambda version: None,
        report_every: float = REPORT_STATUS_EVERY_S,
        pinned: Callable[[], dict[str, str]] = dict,
        refused: Callable[[], dict[str, Any] | None] = lambda: None,
        refused_before: Callable[[], dict[str, Any]] = dict,
        restart_pending: Callable[[], list[str]] = list,
        restart_wanted: Callable[[], Mapping[str, Any]] = dict,
        secrets: frozenset[str] = frozenset(),
    ) -> None:
        self.pinned = pinned
        self.secrets = secrets  # the schema's (``secret_keys``): see ``_shown_errors``
        self.refused = refused  # the etcd values this daemon refused and runs without
        self.refused_before = refused_before  # those it refused and has cleared since
        self.restart_pending = restart_pending  # restart-only keys it holds back
        # Their wanted values, a secret's too: only compared with a process's fingerprints
        # (``_waiting``), never published nor logged.
        self.restart_wanted = restart_wanted
        self._config_files: dict[str, str] = {}  # "rejected", "unreadable": why
        self.node = node
        self.metrics = metrics
        self.revision_of = revision_of
        self.built_at = built_at  # the etcd revision a version was built at
        self.status: StatusPublisher | None = None
        self.guards: GuardManager | None = None
        self.reports = ClientReports()
        self.log = get_logger("hotknob.daemon", app=app)
        self._warned_names: set[str] = set()  # clients told their extra names are dropped
        self._pacing = StatusPacing(self._send, report_every)
        # Per client: the version it last acknowledged, and whether it holds a later one
        # unapplied (``pending.py``), looked at every ``CHECK_EVERY_S`` once started.
        self._acked: dict[str, int] = {}
        # Per client: its connection's id and its last ack as sent. The same ack again on
        # that connection says nothing new, and a client that repeats it in a loop would
        # otherwise rewrite its status entry every ``STATUS_EVERY_S``, push its earlier
        # acks out of what the guards keep, and reset the looks for a state it holds
        # unapplied at each one. (Another connection under the name, a process that took
        # it at once, is another process: its first ack is written.)
        self._last_ack: dict[str, tuple[int, dict[str, Any]]] = {}
        # Per client: the restart-only keys its last ack held at the value it started with,
        # and the fingerprints of those values (``held_digests``), if it sent them.
        self._holds: dict[str, tuple[list[str], Mapping[str, Any] | None]] = {}
        self.pending = PendingStates()
        # The clients whose stored fields the looks made, before an ack or a report said
        # who they are (pid, rank): the first of those replaces them.
        self._unnamed: set[str] = set()
        self._look_timer: asyncio.TimerHandle | None = None

    def on_applied(self, client: ClientInfo, message: dict[str, Any]) -> None:
        version = int(message["version"])
        # Debug only: with many clients every version brings one ack per client.
        self.log.debug("change_applied", client=client.name, version=version, step=message["step"])
        ack = (client.id, message)
        if self._last_ack.get(client.name) == ack:
            return  # a repeat (``_last_ack``): nothing to write, to guard or to look at
        self._last_ack[client.name] = ack
        self._acked[client.name] = version
        self._unnamed.discard(client.name)  # its fields are replaced: see below
        self.pending.forget(client.name)  # what it holds now is looked at afresh
        if message.get("held"):  # restart-only keys it runs as it started, not as sent
            self._holds[client.name] = (sorted(message["held"]), message.get("held_digests"))
        else:
            self._holds.pop(client.name, None)
        entry = self._client_entry(client)
        entry.update(version=version, **self._revisions(version))
        # ``at``: an ack sent again at a reconnect (a daemon restarted) says when the
        # process applied that version; the entry's age counts from then. Never later
        # than now: a clock ahead would make an age below zero.
        now = time.time()
        at = message.get("at")
        entry.update(step=message["step"], time=now if at is None else min(at, now))
        if message.get("errors"):
            entry["errors"] = _shown_errors(message["errors"], self.secrets)
            # Said in the daemon's log too, not only in etcd: an operator reading the log
            # in an incident sees which process could not take which version, and why.
            self.log.warning(
                "change_applied_with_errors",
                client=client.name,
                version=version,
                step=message["step"],
                errors=[{k: cut(str(v), 200) for k, v in e.items()} for e in entry["errors"][:5]],
                **({"more_errors": len(entry["errors"]) - 5} if len(entry["errors"]) > 5 else {}),
            )
        agreed = message.get("agreed")
        if agreed is not None:  # another rank's values, in place of this version's
            entry["agreed"] = {"rank": agreed["rank"], "revision": agreed["revision"]}
        if self.guards is not None:
            self.guards.on_applied(
                client.name, entry["revision"], int(message["step"]), version=version
            )
        if self.status is not None:
            self._pacing.due(
                client.name,
                self._decorated(
                    client.name, self.reports.status_entry(client.name, entry, replace=True)
                ),
            )

    def on_metrics(self, client: ClientInfo, message: dict[str, Any]) -> None:
        report, refused = self.reports.add(client.name, decode_report(message))
        if refused and client.name not in self._warned_names:
            self._warned_names.add(client.name)  # once per connection: it may send them forever
            self.log.warning(
                "client_metrics_dropped",
                client=client.name,
                max_metrics=MAX_METRICS,
                max_name_chars=MAX_NAME_CHARS,
                dropped=len(refused),
                example=refused[0][:80],
            )
        for name, value in report.latest.items():
            self.metrics.client_metric.labels(client.name, name).set(value)
        if self.guards is not None:
            self.guards.on_report(client.name, report)
        if self.status is not None:
            name = client.name
            replace = name in self._unnamed  # the looks' fields, without its pid and rank
            self._unnamed.discard(name)
            entry = self._decorated(
                name,
                self.reports.status_entry(name, self._client_entry(client), replace=replace),
            )
            self._pacing.reported(name, entry)

    def on_revision_unchanged(self) -> None:
        """An etcd revision changed no value in force: the entries of the processes that
        run the state in force say its revision now (``revision_of``), so that ``status``
        and other daemons' guards see the change reached them."""
        for name, entry in self.reports.stored_fields():
            version = entry.get("version")
            revision = self.revision_of(version) if isinstance(version, int) else None
            if revision is not None and entry.get("revision") != revision:
                fields = {k: v for k, v in entry.items() if k != "built"}
                self._republish(name, {**fields, **self._revisions(version)})

    def _revisions(self, version: Any) -> dict[str, Any]:
        """An entry's ``revision``: the etcd revision whose configuration its process runs;
        and ``built``, the revision its state was built at, where older: a later revision
        changed no value in force here. A guard on another node does not wait for such a
        process to apply a change that altered nothing for it
        (``status_entries.unchanged_by``)."""
        revision = self.revision_of(version) if isinstance(version, int) else None
        built = self.built_at(version) if isinstance(version, int) else None
        if built is not None and revision is not None and built < revision:
            return {"revision": revision, "built": built}
        return {"revision": revision}

    def daemon_fields_changed(self) -> None:
        """What an entry says of its daemon changed (the restart-only keys it holds back
        from its processes: ``restart_pending``): every entry says it again."""
        self._republish_all()

    def refusals_changed(self) -> None:
        """What this daemon refused of etcd (``refused``, ``refused.py``) changed: its
        processes' entries say so (``rejected``: the newest refused revision, why, and the
        keys whose etcd values they run without), so that ``status`` and ``set --wait``,
        run elsewhere, can tell a change refused here from one not applied yet. They also
        say the refusals cleared since (``rejected_before``): this entry may be the first
        written since the refusal, which a later revision cleared before it was."""
        self._republish_all()

    def config_files_problem(self, kind: str, reason: str | None) -> None:
        """What is wrong with this daemon's config files, by ``kind``: ``rejected`` (they
        read, but the configuration they make is invalid: the last good one stays in
        force) or ``unreadable`` (one does not parse, or is gone); ``reason`` None: that
        kind is over. The entries say so (``config_files``), so that ``status``, run
        elsewhere, shows why an edit of a ConfigMap or a file in git did not land."""
        before = dict(self._config_files)
        if reason is None:
            self._config_files.pop(kind, None)
        else:
            self._config_files[kind] = cut(reason, REASON_CHARS)
        if self._config_files != before:
            self._republish_all()

    @property
    def config_files(self) -> dict[str, str]:
        """What is wrong with the config files now (``config_files_problem``), for
        ``/healthz``: a daemon without etcd publishes no status entries."""
        return dict(self._config_files)

    @property
    def rejected(self) -> dict[str, Any] | None:
        """The newest etcd revision this daemon refused and still runs without, if any
        (``/healthz``)."""
        return self.refused()

    def _republish_all(self) -> None:
        for name, entry in self.reports.stored_fields():
            self._republish(name, entry)

    def _republish(self, name: str, fields: dict[str, Any]) -> None:
        """Publish ``name``'s stored ``fields``, changed, as its new stored fields."""
        if self.status is None:
            return
        fields = {k: v for k, v in fields.items() if k not in _DAEMON_FIELDS}
        fields.update(self._daemon_fields(name))
        self._pacing.due(
            name, self._decorated(name, self.reports.status_entry(name, fields, replace=True))
        )

    def guard_watching(self, clients: list[str]) -> None:
        """A guard armed here watches ``clients`` from now (they applied the change before
        its record arrived): their entries are published again with its window, which
        other daemons wait on; a process silent since would otherwise never show it."""
        self._republish_named(clients)

    def look_for_pending(self, sent: Iterable[Sent]) -> None:
        """Compare what each process was sent (``sent``) with what it acknowledged; the
        entries of those found holding a state unapplied, or no longer, are published
        again (``pending.py``). One found holding its first state unapplied that has no
        entry (it neither acked nor reported since it connected) gets one: with no
        version or revision, so that ``status`` and ``set --wait`` see it behind."""
        for name in self.pending.look(sent, self._acked, time.time()):
            fields = self.reports.fields_of(name)
            if fields is None and self.pending.field(name) is not None:
                fields = {"client": name, "node": self.node}  # its pid: at its ack or report
                self._unnamed.add(name)
            if fields is not None:
                self._republish(name, fields)

    def _republish_named(self, names: Iterable[str]) -> None:
        """Publish the entries of ``names`` again, from their stored fields, if any."""
        for name in names:
            fields = self.reports.fields_of(name)
            if fields is not None:
                self._republish(name, fields)

    def start_looking(self, sent: Callable[[], Iterable[Sent]]) -> None:
        """Look for processes holding a state unapplied every ``CHECK_EVERY_S`` (on the
        loop, until ``cancel``): ``sent()`` says what each was sent last."""
        loop = asyncio.get_running_loop()

        def look() -> None:
            self._look_timer = loop.call_later(CHECK_EVERY_S, look)
            try:
                self.look_for_pending(sent())
            except Exception as exc:  # the daemon never dies of a status entry
                self.log.exception("pending_look_failed", error=str(exc))

        self._look_timer = loop.call_later(CHECK_EVERY_S, look)

    def on_disconnect(self, client: ClientInfo) -> None:
        self._acked.pop(client.name, None)
        self._holds.pop(client.name, None)
        self._last_ack.pop(client.name, None)
        self._unnamed.discard(client.name)
        self.pending.forget(client.name)
        self._pacing.forget(client.name)
        for name in self.reports.metric_names(client.name):  # its series go with it
            with contextlib.suppress(KeyError):
                self.metrics.client_metric.remove(client.name, name)
        self.reports.forget(client.name)
        self._warned_names.discard(client.name)
        if self.guards is not None:
            self.guards.on_disconnect(client.name)
        if self.status is not None:
            self.status.remove(client.name)

    def _decorated(self, client: str, entry: dict[str, Any]) -> dict[str, Any]:
        """``entry`` with the windows of the guards watching ``client`` (other daemons read
        them to know when a guard may pass), if any, and the state it holds unapplied
        (``pending``), if a look found one."""
        windows = self.guards.windows_of(client) if self.guards is not None else {}
        pending = self.pending.field(client)
        if not windows and pending is None:
            return entry
        entry = dict(entry)
        if windows:
            entry["guards"] = windows
        if pending is not None:
            entry["pending"] = pending
        return entry

    def cancel(self) -> None:
        """Drop a status flush still due, the reports' entries held back and the looks for
        states unapplied (at stop)."""
        self._pacing.cancel()
        if self._look_timer is not None:
            self._look_timer.cancel()
            self._look_timer = None

    def _client_entry(self, client: ClientInfo) -> dict[str, Any]:
        """The fields of ``client``'s entry that its ``hello`` gave. ``rank`` and
        ``world_size`` only as integers from 0 to ``protocol.MAX_INT``: a ``hello`` may
        hold any JSON up to 1 MiB there, which every rewrite of the entry (each ack,
        every ``STATUS_EVERY_S`` in a flood of them) would otherwise copy into etcd's
        history."""
        entry: dict[str, Any] = {"client": client.name, "pid": client.pid, "node": self.node}
        for name in ("rank", "world_size"):
            value = client.extra.get(name)
            if is_int(value) and 0 <= value <= protocol.MAX_INT:
                entry[name] = value
        return {**entry, **self._daemon_fields(client.name)}

    def _daemon_fields(self, name: str) -> dict[str, Any]:
        """What an entry says of its daemon: the keys env or ``--set`` hold on it (``set``
        warns of editing them), the etcd revision it rejected, if none taken since, the
        refusals a revision taken since cleared (``set --wait`` of a refused revision
        tells by them that this process never ran it, though it runs a later one), and
        what is wrong with its config files, if anything; and the restart-only keys that
        wait for a restart of process ``name``, held back by its daemon (``restart_pending``)
        or by the process itself (``held``), but those it runs at the value wanted
        (``_waiting``)."""
        fields: dict[str, Any] = {}
        pinned = self.pinned()
        if pinned:
            fields["pinned"] = pinned
        rejected = self.refused()
        if rejected:
            fields["rejected"] = rejected
        before = self.refused_before()
        if before:
            fields["rejected_before"] = before
        if self._config_files:
            fields["config_files"] = dict(self._config_files)
        pending, held = self._waiting(name, self.restart_pending())
        if pending:
            fields["restart_pending"] = pending
        if held:
            fields["held"] = held
        return fields

    def _waiting(self, name: str, pending: list[str]) -> tuple[list[str], list[str]]:
        """The keys of ``pending`` (held back by this daemon) and of those process ``name``
        holds (its ack's ``held``) that wait for a restart of it: all, but those it holds at
        the value this daemon wants, which its fingerprints (``held_digests``) say. The
        scenario: it started with 32, its daemon was restarted alone after a ``set`` of 64
        (it holds 64 back from then on, and the process holds 32), then 32 was set again:
        the process runs what is wanted, and a restart would change nothing. A process that
        runs a third value (it started with 16), or did not say what it runs (an older
        runtime), still waits."""
        held, digests = self._holds.get(name, ([], None))
        if not held or not pending or digests is None:
            return pending, held
        wanted = self.restart_wanted()
        runs_wanted = {
            key
            for key in set(held) & set(pending)
            if key in digests and key in wanted and _digest_of(wanted[key]) == digests[key]
        }
        return (
            [key for key in pending if key not in runs_wanted],
            [key for key in held if key not in runs_wanted],
        )

    def _send(self, name: str, entry: dict[str, Any]) -> None:
        if self.status is not None:
            self.status.publish(name, entry)


def _digest_of(value: Any) -> str | None:
    """``value``'s fingerprint as a process makes it (``protocol.held_digest``); None for a
    value JSON cannot carry, which no process runs."""
    try:
        return protocol.held_digest(value)
    except (TypeError, ValueError):
        return None
