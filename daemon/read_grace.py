"""How long a config file that cannot be read is waited for before the watcher says so.

A read can meet a file between two steps of a save: a file deleted mid-rename is
missing for a moment, and one truncated and not yet written does not parse. The
watcher (``file_watcher``) reads every file at each check; of the files that failed,
this keeps since when each has been missing, or there and unreadable, and says which
are still within their grace: the watcher holds their problems back, and checks again
when the first grace ends. It is apart from the watcher because it is one rule with its
own clock per file: it reads nothing and reports nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path


class ReadGraces:
    """Since when each file that cannot be read has been so; called under the watcher's
    check lock."""

    def __init__(
        self, missing_grace_s: float, bad_grace_s: float, recheck_at: Callable[[float], None]
    ):
        """``bad_grace_s``: the watcher's ``debounce_s``. ``recheck_at`` is told when the
        first grace ends."""
        self._missing_grace_s = missing_grace_s
        self._bad_grace_s = bad_grace_s
        self._recheck_at = recheck_at
        self._missing_since: dict[Path, float] = {}  # since when each missing file is
        self._bad_since: dict[Path, float] = {}  # since when each file there does not read

    def awaited(
        self, failed: Mapping[Path, Exception], missing: list[Path], explicit: bool
    ) -> frozenset[Path]:
        """Of the files that could not be read, those given a moment more (none, for an
        explicit reload, which reports them at once); a check is due when the first of
        their graces ends.

        A file found ``missing`` waits ``missing_grace_s``: it may be mid-rename. One
        that is there but does not read waits ``debounce_s``: a read can beat the events,
        and meet a file that a writer has truncated and not yet written (an empty file,
        or half of one) before the truncate's event has reached the watcher."""
        now = time.monotonic()
        self._missing_since = {path: self._missing_since.get(path, now) for path in missing}
        self._bad_since = {
            path: self._bad_since.get(path, now) for path in failed if path not in missing
        }
        if explicit:
            return frozenset()
        graces = [
            (self._missing_since, self._missing_grace_s),
            (self._bad_since, self._bad_grace_s),
        ]
        ends = {
            path: since + grace
            for sinces, grace in graces
            for path, since in sinces.items()
            if now < since + grace
        }
        if ends:
            self._recheck_at(min(ends.values()))
        return frozenset(ends)
