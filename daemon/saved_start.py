"""What the engine's start takes from the state file the last daemon left.

- The saved state, read once (``saved``): a start with etcd out of reach serves its etcd
  values, and a start that reads etcd keeps its value for a key it now refuses.
- The config files' contents as the last daemon ran them (``saved_files``): a config
  file that makes the configuration invalid at a restart does not stop the daemon, which
  starts on those instead (``first_merge``), and says why (``files_refused``).
- The first version (``first_version``): a clean saved state with the same values keeps
  its version (clients apply nothing); otherwise the version starts above everything the
  last daemon could have published.

It is apart from the engine because all of it is done once, before anything is served:
no live change reads the state file, nor falls back on what it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hotknob.config import InvalidChange, Layer, Snapshot

from .config_files import ConfigFiles
from .state_format import SavedState
from .state_keeper import StateKeeper

_NOT_READ = object()


class SavedStart:
    """The state file of ``keeper`` (None: the daemon keeps none) as a start reads it;
    ``files`` is the engine's own, told of the contents it starts on."""

    def __init__(self, keeper: StateKeeper | None, files: ConfigFiles, log: Any) -> None:
        self._keeper = keeper
        self._files = files
        self._log = log
        self._saved: SavedState | object | None = _NOT_READ  # the state file, read once
        self.files_refused: str | None = None
        """Why the config files were refused at the start, which ran on their saved
        contents instead (``first_merge``); None if they were not."""

    def saved(self) -> SavedState | None:
        """The saved state, if any (read at the first call)."""
        if self._saved is _NOT_READ:
            self._saved = self._keeper.load() if self._keeper is not None else None
        return self._saved  # type: ignore[return-value]

    def saved_files(self, paths: Sequence[Path]) -> dict[Path, Mapping[str, Any]]:
        """The contents of the config files ``paths`` as the saved state ran them, by path;
        none unless it ran these very files, in this order. Reads the state file (once:
        ``start`` uses what it read)."""
        saved = self.saved()
        if saved is None or [path for path, _ in saved.files] != [str(p) for p in paths]:
            return {}
        return {Path(path): contents for path, contents in saved.files}

    def first_merge(
        self,
        layers: dict[str, Layer],
        files: Sequence[tuple[Path, Mapping[str, Any]]] | None,
        merge: Callable[[], Snapshot],
    ) -> Snapshot:
        """``start``'s merge: ``merge`` of ``layers`` (the engine's own), whose files layer
        was built from ``files``. A config file that makes the configuration invalid at a
        restart (edited while the daemon ran, which refused it and ran on) does not stop
        the daemon: it starts on the contents those files had as it ran them, if the
        state file holds them (this replaces the files layer of ``layers`` with them), as
        a refused edit leaves the last good contents in force. The next valid save is
        taken as any edit."""
        try:
            return merge()
        except InvalidChange as exc:
            ran = self.saved_files([path for path, _ in files]) if files is not None else {}
            blamed = any(p.layer in ("files", "") for p in exc.problems)
            if not ran or not blamed or list(ran.items()) == list(files or ()):
                raise
            refused = exc
        layers["files"] = self._files.run_on(list(ran.items()))
        try:
            snapshot = merge()
        except InvalidChange:
            raise refused from None  # the saved contents do not help: the files' reason
        self.files_refused = str(refused)
        self._files.refused_at_start(files or (), ran, self.files_refused)
        self._log.warning(
            "config_files_refused_at_start",
            reason=str(refused),
            detail="started on the contents the config files had when this daemon last ran",
        )
        return snapshot

    def first_version(self, values: Mapping[str, Any]) -> int:
        """The version a start publishes ``values`` (the state it starts on) at."""
        saved = self.saved()
        if saved is None:
            return 1
        if saved.clean and dict(saved.values) == dict(values):
            return saved.version
        return saved.next_version()
