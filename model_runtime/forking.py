"""A ``LiveConfig`` in a process forked from the one that connected.

A DataLoader worker with the ``fork`` start method (or a worker of a pre-fork server)
inherits the client but not its background thread: no change reaches it after the fork.
An at-fork hook, for every ``LiveConfig`` of the process (``live_configs``), makes the
locks new, sends reports nowhere, and has the child's first ``apply`` say so in the log
(``after_fork_in_child``, ``first_apply_in_forked_child``: bound as methods of
``client.LiveConfig``, with a leading ``_``). The connection's own at-fork hook
(``connection``) closes the child's copy of the socket; it runs first, since
``client`` imports ``connection`` before this module, which registers its hook.

Apart from ``client.LiveConfig`` because it runs only in the child, once, at the fork:
none of it is on the path of a change or of an ``apply`` in the process that connected.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import LiveConfig

log = logging.getLogger("hotknob.model_runtime")


def report_nothing(step: int, **metrics: Any) -> None:
    """``report`` after ``close``, and in a forked child."""


def after_fork_in_child(live: LiveConfig) -> None:
    """In a forked child (``os.register_at_fork``): locks that a thread of the parent
    may have held at the fork are made new, and reports go nowhere (no thread sends
    them: they would pile up). Nothing logged here: a logging lock may be held too."""
    live._lock = threading.Lock()
    live._applying = threading.Lock()
    live._apply_owner = None
    live._first_state = threading.Event()  # its lock, too, may have been held
    live._first_state.set()
    live._reporter.forked()
    live.report = report_nothing
    # Said at the child's first apply (its caller expects changes), by an instance
    # attribute that shadows the method once: nothing on the path of later calls.
    live.apply = live._first_apply_in_forked_child  # type: ignore[method-assign]


def first_apply_in_forked_child(live: LiveConfig, step: int) -> bool:
    live.__dict__.pop("apply", None)
    log.warning(
        "live_config_forked pid=%d client=%s: this process was forked from the one "
        "that connected (a DataLoader worker, a worker of a pre-fork server): no "
        "change reaches it after the fork, nor does hotknob status show it; connect "
        "in this process, after the fork, for its own changes",
        os.getpid(),
        live._client,
    )
    return live.apply(step)


live_configs: weakref.WeakSet[LiveConfig] = weakref.WeakSet()
"""Every ``LiveConfig`` made in this process, for the at-fork hook."""


def _after_fork() -> None:
    for live in list(live_configs):
        live._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
