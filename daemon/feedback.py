"""What clients say back: ``applied`` acks and ``metrics`` reports, to status, guards and
Prometheus.

Every version brings one ack per client, and each status entry is an etcd write that
in a burst or with many clients would compete with the changes themselves: entries go
to the status publisher at most every ``STATUS_EVERY_S``, the newest per client. A
report's entry goes at once (it includes the last ack). All on the event loop; the
status publisher and the guards are set once the daemon has started them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from .guards import GuardManager
from .logs import get_logger
from .metrics import Metrics
from .published import ClientInfo
from .reports import MAX_METRICS, MAX_NAME_CHARS, ClientReports, decode_report
from .status import StatusPublisher
from .throttle import Throttle

STATUS_EVERY_S = 0.2


class ClientFeedback:
    def __init__(
        self, *, app: str, node: str, metrics: Metrics, revision_of: Callable[[int], int | None]
    ) -> None:
        self.node = node
        self.metrics = metrics
        self.revision_of = revision_of
        self.status: StatusPublisher | None = None
        self.guards: GuardManager | None = None
        self.reports = ClientReports()
        self.log = get_logger("hotknob.daemon", app=app)
        self._status_due: dict[str, dict[str, Any]] = {}
        self._warned_names: set[str] = set()  # clients told their extra names are dropped
        self._status_soon = Throttle(STATUS_EVERY_S, self._flush_status)

    def on_applied(self, client: ClientInfo, message: dict[str, Any]) -> None:
        version = int(message["version"])
        entry = self._client_entry(client)
        entry.update(
            version=version,
            revision=self.revision_of(version),
            step=message["step"],
            time=time.time(),
        )
        if message.get("errors"):
            entry["errors"] = message["errors"]
        # Debug only: with many clients every version brings one ack per client.
        self.log.debug("change_applied", client=client.name, version=version, step=message["step"])
        if self.guards is not None:
            self.guards.on_applied(client.name, entry["revision"], int(message["step"]))
        if self.status is not None:
            self._status_due[client.name] = self._with_guards(
                client.name, self.reports.status_entry(client.name, entry, replace=True)
            )
            self._status_soon()

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
            entry = self.reports.status_entry(
                client.name, self._client_entry(client), replace=False
            )
            self._status_due.pop(client.name, None)  # this entry is newer: it includes the ack
            self.status.publish(client.name, self._with_guards(client.name, entry))

    def on_disconnect(self, client: ClientInfo) -> None:
        self._status_due.pop(client.name, None)
        for name in self.reports.metric_names(client.name):  # its series go with it
            with contextlib.suppress(KeyError):
                self.metrics.client_metric.remove(client.name, name)
        self.reports.forget(client.name)
        self._warned_names.discard(client.name)
        if self.guards is not None:
            self.guards.on_disconnect(client.name)
        if self.status is not None:
            self.status.remove(client.name)

    def _with_guards(self, client: str, entry: dict[str, Any]) -> dict[str, Any]:
        """``entry`` with the windows of the guards watching ``client`` (other daemons read
        them to know when a guard may pass), if any."""
        windows = self.guards.windows_of(client) if self.guards is not None else {}
        return {**entry, "guards": windows} if windows else entry

    def cancel(self) -> None:
        """Drop a status flush still due (at stop)."""
        self._status_soon.cancel()

    def _client_entry(self, client: ClientInfo) -> dict[str, Any]:
        entry: dict[str, Any] = {"client": client.name, "pid": client.pid, "node": self.node}
        entry.update({k: v for k, v in client.extra.items() if k in ("rank", "world_size")})
        return entry

    def _flush_status(self) -> None:
        due, self._status_due = self._status_due, {}
        if self.status is not None:
            for name, entry in due.items():
                self.status.publish(name, entry)
