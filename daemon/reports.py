"""What processes report with ``live.report``: decoding ``metrics`` messages, keeping recent ones.

A ``metrics`` message carries, per metric, the values reported since the
process's previous message (``window``, oldest first) and the newest one
(``latest``). Non-finite values travel as ``"nan"``, ``"inf"``, ``"-inf"``
(JSON has no NaN); ``decode_value`` reads them back. Anything that is not a
number is dropped, so a newer client's extra fields never break a daemon.

``ClientReports`` keeps, per connected process, its last ``HISTORY`` values of
each metric; ``status_fields`` is what the daemon publishes in the process's
status entry (JSON-safe: non-finite values are written as the same strings).
All methods run on the daemon's event loop.

A client speaking the protocol by hand is not held to the runtime's limits, so the
daemon keeps them itself: at most ``MAX_METRICS`` names per process, each at most
``MAX_NAME_CHARS`` characters (others are dropped before Prometheus, guards or
status see them), and a status entry's metrics part of at most
``STATUS_METRICS_BYTES`` as JSON, far below etcd's default request limit of 1.5 MiB.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hotknob.model_runtime import protocol

HISTORY = 32
MAX_METRICS = 256
"""Metric names kept per process: the runtime's own limit (``model_runtime.reporting``)."""
MAX_NAME_CHARS = 200
"""The longest metric name kept, in characters: the runtime's own limit too."""
STATUS_METRICS_BYTES = 256 * 1024
"""The most a status entry's ``metrics`` part takes as JSON; names past it are left out."""
REPORT_STATUS_EVERY_S = 5.0
"""Default of ``hotknob run --status-every``: the most often a process's reports alone
rewrite its status entry in etcd (``feedback.ClientFeedback``)."""


decode_value = protocol.decode_number
encode_value = protocol.encode_number


@dataclass(frozen=True)
class Report:
    """One decoded ``metrics`` message: ``window`` always holds at least ``latest``."""

    step: int
    latest: dict[str, float]
    window: dict[str, list[float]]

    def value(self, metric: str) -> float | None:
        """The mean of the values reported since the previous message (NaN if any is NaN)."""
        values = self.window.get(metric)
        return mean_of(values) if values else None

    def values(self) -> dict[str, float]:
        return {name: v for name in self.window if (v := self.value(name)) is not None}

    def non_finite(self, metrics: frozenset[str] | set[str]) -> dict[str, float]:
        """Each of ``metrics`` that was reported as NaN or ±inf, with that value."""
        found: dict[str, float] = {}
        for name in metrics:
            bad = [v for v in self.window.get(name, ()) if not math.isfinite(v)]
            if bad:
                found[name] = bad[0]
        return found


def mean_of(values: Sequence[float]) -> float:
    """The mean of ``values``: the worst non-finite one if any is (NaN first), and no
    overflow for large finite ones (``fsum`` of ``1e308`` and ``1e308`` overflows)."""
    if not all(map(math.isfinite, values)):
        return _worst(values)
    try:
        return math.fsum(values) / len(values)
    except OverflowError:
        return math.fsum(v / len(values) for v in values)


def _worst(values: Sequence[float]) -> float:
    for v in values:
        if math.isnan(v):
            return v
    return next(v for v in values if not math.isfinite(v))


def decode_report(message: Mapping[str, Any]) -> Report:
    """A validated ``metrics`` message (``step`` and ``latest`` checked by the protocol)."""
    latest: dict[str, float] = {}
    for name, raw in dict(message.get("latest") or {}).items():
        value = decode_value(raw)
        if value is not None:
            latest[str(name)] = value
    window: dict[str, list[float]] = {}
    raw_window = message.get("window")
    if isinstance(raw_window, Mapping):
        for name, raws in raw_window.items():
            if not isinstance(raws, list):
                continue
            decoded = [v for v in map(decode_value, raws) if v is not None]
            if decoded:
                window[str(name)] = decoded
    for name, value in latest.items():
        if name not in window:
            window[name] = [value]
    return Report(int(message["step"]), latest, window)


@dataclass
class _Recent:
    step: int = 0
    time: float = 0.0
    latest: dict[str, float] = field(default_factory=dict)
    history: dict[str, deque[float]] = field(default_factory=dict)


class ClientReports:
    """The recent reports of each connected process, by client name."""

    def __init__(self, history: int = HISTORY) -> None:
        self._history = history
        self._clients: dict[str, _Recent] = {}
        self._entries: dict[str, dict[str, Any]] = {}

    def add(self, client: str, report: Report) -> tuple[Report, list[str]]:
        """Keep ``report`` of ``client``; return it without the names refused, and those.

        A name is refused if it is longer than ``MAX_NAME_CHARS``, or new once the
        client has ``MAX_METRICS`` names: that bounds the memory and Prometheus series
        one client costs, whatever it sends.
        """
        recent = self._clients.setdefault(client, _Recent())
        report, refused = self._admit(recent, report)
        recent.step = report.step
        recent.time = time.time()
        recent.latest.update(report.latest)
        for name, values in report.window.items():
            recent.history.setdefault(name, deque(maxlen=self._history)).extend(values)
        return report, refused

    @staticmethod
    def _admit(recent: _Recent, report: Report) -> tuple[Report, list[str]]:
        known = recent.history  # every name kept has its history (``window`` has them all)
        room = MAX_METRICS - len(known)
        refused = []
        for name in report.window:
            if name in known:
                continue
            if len(name) > MAX_NAME_CHARS or room <= 0:
                refused.append(name)
            else:
                room -= 1
        if not refused:
            return report, refused
        out = set(refused)
        latest = {k: v for k, v in report.latest.items() if k not in out}
        window = {k: v for k, v in report.window.items() if k not in out}
        return Report(report.step, latest, window), refused

    def metric_names(self, client: str) -> list[str]:
        """Every metric ``client`` has reported (while it is remembered)."""
        recent = self._clients.get(client)
        return [] if recent is None else sorted({*recent.latest, *recent.history})

    def forget(self, client: str) -> None:
        self._clients.pop(client, None)
        self._entries.pop(client, None)

    def means(self, client: str) -> dict[str, float]:
        """The mean of each metric's last ``HISTORY`` values (NaN if any of them is)."""
        recent = self._clients.get(client)
        if recent is None:
            return {}
        return {n: mean_of(h) for n, h in recent.history.items() if h}

    def status_fields(self, client: str) -> dict[str, Any]:
        """``{"metrics": {"step", "time", "latest", "mean"}}`` for the status entry, or ``{}``."""
        recent = self._clients.get(client)
        if recent is None or not recent.latest:
            return {}
        metrics: dict[str, Any] = {
            "step": recent.step,
            "time": recent.time,
            "latest": {k: encode_value(v) for k, v in sorted(recent.latest.items())},
            "mean": {k: encode_value(v) for k, v in sorted(self.means(client).items())},
        }
        return {"metrics": _bounded(metrics)}

    def stored_fields(self) -> list[tuple[str, dict[str, Any]]]:
        """Each client's stored status fields (its last acknowledgement's), by name."""
        return list(self._entries.items())

    def fields_of(self, client: str) -> dict[str, Any] | None:
        """``client``'s stored status fields, if any."""
        return self._entries.get(client)

    def status_entry(
        self, client: str, fields: Mapping[str, Any], *, replace: bool
    ) -> dict[str, Any]:
        """The whole status entry of ``client``: its stored fields plus its latest metrics.

        ``fields`` become the stored fields if ``replace`` (a new acknowledgement) or
        if none are stored yet (metrics before any acknowledgement).
        """
        if replace or client not in self._entries:
            self._entries[client] = dict(fields)
        return {**self._entries[client], **self.status_fields(client)}


def _bounded(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with ``latest`` and ``mean`` cut to fit ``STATUS_METRICS_BYTES`` as JSON.

    One entry too large for etcd would be refused whole, so names are kept in order
    while they fit and the rest are counted in ``omitted``. The exact size is measured
    only when a cheap upper bound says it may be too large: ``json.dumps`` writes at
    most 12 bytes per character (an escaped surrogate pair) and 24 per number.
    """
    latest, mean = metrics["latest"], metrics["mean"]
    names = sorted({*latest, *mean})
    if sum(12 * len(name) + 32 for name in names) * 2 + 200 <= STATUS_METRICS_BYTES:
        return metrics
    if len(json.dumps(metrics)) <= STATUS_METRICS_BYTES:
        return metrics
    budget = STATUS_METRICS_BYTES - 200  # the braces, step, time and ``omitted``
    kept: dict[str, dict[str, Any]] = {"latest": {}, "mean": {}}
    for name in names:
        key = len(json.dumps(name)) + 2
        size = sum(key + len(json.dumps(part[name])) for part in (latest, mean) if name in part)
        if size > budget:
            break
        budget -= size
        for label, part in (("latest", latest), ("mean", mean)):
            if name in part:
                kept[label][name] = part[name]
    omitted = len(names) - len(kept["latest"].keys() | kept["mean"].keys())
    return {**metrics, **kept, "omitted": omitted}


def metrics_summary(entry: Mapping[str, Any], limit: int = 4) -> str:
    """``loss=0.412 grad_norm=1.3`` from a status entry's latest metrics, for ``status``."""
    latest = (entry.get("metrics") or {}).get("latest") or {}
    parts = []
    for name, raw in sorted(latest.items())[:limit]:
        value = decode_value(raw)
        parts.append(f"{name}={value:.4g}" if value is not None else f"{name}=?")
    if len(latest) > limit:
        parts.append(f"(+{len(latest) - limit})")
    return " ".join(parts)
