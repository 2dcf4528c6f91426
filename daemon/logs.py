"""structlog set-up: JSON lines when stderr is not a terminal, readable console output when it is.

Events are stable snake_case names (``change_accepted``, ``change_rejected``,
``update_shadowed``, ``etcd_reconnected``) with bound context. Secrets never
reach a log line: values of keys the schema marks secret are masked before
they are logged, by the caller, and ``password`` fields are dropped here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SENSITIVE = ("password", "token", "secret")


def _drop_sensitive(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event):
        if any(word in name.lower() for word in _SENSITIVE):
            event[name] = "**********"
    return event


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """Configure structlog for the process (the daemon and the CLI call this once)."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_sensitive,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Library loggers (grpc, watchdog) go to stderr at warning and above, never as tracebacks.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")


def get_logger(name: str = "hotknob", **bound: Any) -> Any:
    return structlog.get_logger(name).bind(**bound)
