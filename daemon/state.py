"""The last-known-good state: the accepted snapshot and its version, written atomically.

The file survives a daemon restart so that versions keep increasing and a
daemon started while etcd is down can serve the values it last accepted.
A write is all-or-nothing (temp file, fsync, rename); a failed write is
reported to the caller and never takes the daemon down.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1


@dataclass(frozen=True)
class SavedState:
    version: int
    revision: int
    values: Mapping[str, Any]
    etcd: Mapping[str, Any] = field(default_factory=dict)
    saved_at: float = 0.0


class StateStore:
    """``<state-dir>/<app>.json`` holding the last accepted state."""

    def __init__(self, state_dir: Path, app: str):
        self.path = Path(state_dir) / f"{app}.state.json"

    def load(self) -> SavedState | None:
        """The saved state, or None if there is none or it cannot be read (never raises)."""
        try:
            data = json.loads(self.path.read_text("utf-8"))
            if data.get("format") != FORMAT:
                return None
            return SavedState(
                version=int(data["version"]),
                revision=int(data["revision"]),
                values=dict(data["values"]),
                etcd=dict(data.get("etcd", {})),
                saved_at=float(data.get("saved_at", 0.0)),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, state: SavedState) -> None:
        """Write ``state`` atomically; raises OSError if the directory is not writable or full."""
        payload = {
            "format": FORMAT,
            "version": state.version,
            "revision": state.revision,
            "values": state.values,
            "etcd": state.etcd,
            "saved_at": time.time(),
        }
        text = json.dumps(payload, sort_keys=True, allow_nan=False)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
