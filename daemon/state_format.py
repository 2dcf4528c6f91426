"""What the state file holds and its form on disk: ``SavedState``, as JSON, and read back.

``StateStore`` (``state.py``) keeps the file: where it is, its lock, how it is written
(whole, never over a newer one), what becomes of one it cannot read. This module says what
goes into it and what a file's contents must be to count as a state of this format (a
``version`` below the protocol's limit, ``values`` and ``etcd`` objects, ``files`` as
``[path, contents]`` pairs); anything else is ``Unreadable``, with why. It is apart so that
the format reads on its own, and a field added or checked touches nothing of the file's
handling.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hotknob.model_runtime.protocol import MAX_INT

FORMAT = 1


@dataclass(frozen=True)
class SavedState:
    """``version_ceiling``: no version above it was published; ``clean``: a clean stop
    wrote this, and nothing was published after it."""

    version: int
    revision: int
    values: Mapping[str, Any]
    etcd: Mapping[str, Any] = field(default_factory=dict)
    files: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    """Each config file's contents in the state, by path, in ``--config`` order: a daemon
    restarted on files it cannot read or refuses starts on these (``Engine.start``)."""
    saved_at: float = 0.0
    version_ceiling: int = 0
    clean: bool = False

    def next_version(self) -> int:
        """The lowest version a new daemon may publish for values that differ from these."""
        if self.clean:
            return self.version + 1
        return max(self.version, self.version_ceiling) + 1


class Unreadable(Exception):
    """Contents that are not a state of this format; the message says why."""


def encode(state: SavedState, ceiling: int, saved_at: float) -> str:
    """The file's contents for ``state``, with the version ceiling ``ceiling``."""
    payload = {
        "format": FORMAT,
        "version": state.version,
        "revision": state.revision,
        "values": state.values,
        "etcd": state.etcd,
        "files": [[path, contents] for path, contents in state.files],
        "saved_at": saved_at,
        "version_ceiling": ceiling,
        "clean": state.clean,
    }
    return json.dumps(payload, sort_keys=True, allow_nan=False)


def decode(text: bytes) -> SavedState:
    """A state file's contents; raises ``Unreadable`` saying why they are not a state."""
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        what = "empty" if not text.strip() else f"not JSON ({exc})"
        raise Unreadable(f"{what}; {len(text)} bytes (truncated or corrupt)") from None
    except RecursionError:  # nested deeper than the parser goes: no state is
        raise Unreadable(f"JSON nested too deep; {len(text)} bytes (corrupt)") from None
    if not isinstance(data, dict):
        raise Unreadable(f"not a state: a JSON {type(data).__name__}, not an object")
    if data.get("format") != FORMAT:
        raise Unreadable(f"format {data.get('format')!r}; this daemon reads format {FORMAT}")
    try:
        # Below the protocol's limit, with room for the next: a client cannot acknowledge
        # a version above it, nor would any process ever see the next one published.
        version = _count(data, "version", MAX_INT - 1)
        reserved = "version_ceiling" in data
        values, etcd = data["values"], data.get("etcd", {})
        if not isinstance(values, dict) or not isinstance(etcd, dict):
            raise ValueError("values and etcd must be objects")
        return SavedState(
            version=version,
            revision=_count(data, "revision"),
            values=values,
            etcd=etcd,
            files=_files(data.get("files", [])),
            saved_at=float(data.get("saved_at", 0.0)),
            version_ceiling=_count(data, "version_ceiling", MAX_INT - 1) if reserved else version,
            clean=data.get("clean", False) is True if reserved else True,
        )
    except KeyError as exc:
        raise Unreadable(f"no {exc.args[0]!r} field") from None
    except (ValueError, TypeError, OverflowError) as exc:  # Overflow: too large for a float
        raise Unreadable(f"a field of the wrong type: {exc}") from None


def _files(raw: Any) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    """A state file's ``files``: a list of ``[path, contents]`` (none in a file written
    before they were saved)."""
    if not isinstance(raw, list) or not all(
        isinstance(item, list)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], dict)
        for item in raw
    ):
        raise ValueError("files must be a list of [path, contents] pairs")
    return tuple((path, contents) for path, contents in raw)


def _count(data: Mapping[str, Any], name: str, most: int = MAX_INT) -> int:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise ValueError(f"{name} is {value!r}, not a whole number from 0 to {most}")
    return value
