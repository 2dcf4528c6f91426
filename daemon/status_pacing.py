"""When a process's status entry goes to the status publisher: the newest per process, paced.

Every version brings one ack per client, and each status entry is an etcd write that
in a burst or with many clients would compete with the changes themselves: entries go
to the status publisher at most every ``STATUS_EVERY_S``, the newest per client.

Reports come about once a second from every process, for as long as the job runs, and
etcd keeps every revision until its history is compacted: a status entry per report
would grow etcd by ~1.6 MB an hour per process (a hundred 8-GPU nodes would fill its
default 2 GiB quota in under two hours; docs/deploy.md, "etcd's space"). So what a
report alone changes (the metrics' values) is published at most every ``report_every``
seconds per process, the newest, and the last one when reports stop; the entry goes at
once when the report changes more than values (``_shape``: the process's first report,
a metric it starts reporting, what the entry says of the guards watching the process,
which other daemons read to end a guard), or with an ack.

What an entry says is ``feedback.py``'s to make; only when it goes is decided here, on
the event loop, apart from what the acks and reports mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .throttle import Throttle

STATUS_EVERY_S = 0.2


class StatusPacing:
    """The entries due to the status publisher, by process: ``send(name, entry)`` hands
    one to it when its time comes."""

    def __init__(self, send: Callable[[str, dict[str, Any]], None], report_every: float) -> None:
        self._send = send
        self.report_every = report_every
        self._due: dict[str, dict[str, Any]] = {}
        self._soon = Throttle(STATUS_EVERY_S, self._flush)
        # Per client: its entry's shape when last published (``_shape``), a report's entry
        # held back, and the throttle that publishes those at most every ``report_every``.
        self._published_shape: dict[str, tuple[Any, frozenset[str]]] = {}
        self._held: dict[str, dict[str, Any]] = {}
        self._report_soon: dict[str, Throttle] = {}

    def due(self, name: str, entry: dict[str, Any]) -> None:
        """``name``'s entry after an ack, or its stored fields changed: it goes with the
        next flush, at most every ``STATUS_EVERY_S``."""
        self._due[name] = entry
        self._soon()

    def reported(self, name: str, entry: dict[str, Any]) -> None:
        """``name``'s entry after a report: at once if the report changed more than its
        metrics' values (``_shape``), else held back, the newest, for ``report_every``."""
        if name in self._due:
            self._due[name] = entry  # newer, with the ack: it goes with the ack
        elif _shape(entry) != self._published_shape.get(name):
            self._publish(name, entry)
        else:
            self._held[name] = entry
            self._throttle(name)()  # now, or the newest when ``report_every`` is up

    def forget(self, name: str) -> None:
        """Drop what is due or held back of ``name`` (its process left)."""
        self._due.pop(name, None)
        self._forget_published(name)

    def cancel(self) -> None:
        """Drop a flush still due and the reports' entries held back (at stop)."""
        self._soon.cancel()
        for name in list(self._report_soon):
            self._forget_published(name)

    def _flush(self) -> None:
        due, self._due = self._due, {}
        for name, entry in due.items():
            self._publish(name, entry)

    def _publish(self, name: str, entry: dict[str, Any]) -> None:
        """Publish ``entry`` now; a report's entry held back is older: dropped, and the next
        one waits ``report_every`` from now."""
        self._held.pop(name, None)
        throttle = self._throttle(name)
        throttle.cancel()
        throttle.ran()
        self._published_shape[name] = _shape(entry)
        self._send(name, entry)

    def _throttle(self, name: str) -> Throttle:
        throttle = self._report_soon.get(name)
        if throttle is None:
            throttle = self._report_soon[name] = Throttle(
                self.report_every, lambda: self._release(name)
            )
        return throttle

    def _release(self, name: str) -> None:
        entry = self._held.get(name)
        if entry is not None:
            self._publish(name, entry)

    def _forget_published(self, name: str) -> None:
        self._published_shape.pop(name, None)
        self._held.pop(name, None)
        throttle = self._report_soon.pop(name, None)
        if throttle is not None:
            throttle.cancel()


def _shape(entry: dict[str, Any]) -> tuple[Any, frozenset[str]]:
    """What a status entry says beyond its metrics' values: the guards watching the
    process, and the names it reports. A report that changes it is published at once (a
    process's first report; a metric it starts reporting, which a guarded ``set`` looks
    for; a guard's window, which other daemons wait on)."""
    metrics = entry.get("metrics")
    latest = metrics.get("latest") if isinstance(metrics, dict) else None
    return entry.get("guards"), frozenset(latest) if isinstance(latest, dict) else frozenset()
