"""A ``LiveConfig`` checkpoint: the dict ``state_dict`` returns, reading one back, and
whether the daemon's state is newer than it.

A checkpoint holds the applied version, etcd revision, step and values, plus each
binding's own state, as plain dicts and lists (``saved``), so ``torch.save`` and JSON both
carry it. ``read`` takes one back, of this ``FORMAT`` only. Once loaded, the daemon's
state wins over it only if it is newer (``newer_than``).

Apart from ``client.LiveConfig`` because the format outlives the process: a run resumes
from a file an earlier run saved, so what a checkpoint holds and how it is read back is
one contract, kept in one place; the client decides what a load changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import protocol
from .received import State, state_from_message, thaw

FORMAT = 1


def saved(state: State, step: int, bindings: list[Any]) -> dict[str, Any]:
    """The checkpoint of ``state`` applied at ``step``, with the bindings' own states."""
    return {
        "format": FORMAT,
        "version": state.version,
        "revision": state.revision,
        "step": step,
        "values": thaw(state.values),
        "bindings": bindings,
    }


def read(state_dict: Mapping[str, Any]) -> State:
    """The state a checkpoint holds; ``ValueError`` if it is none of this format."""
    try:
        fmt = state_dict.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"unsupported LiveConfig state_dict format {fmt!r}")
        return state_from_message({"type": "state_dict", **state_dict})
    except protocol.ProtocolError as exc:
        raise ValueError(f"not a LiveConfig state_dict: {exc}") from exc


def newer_than(daemon: State, checkpoint: State) -> bool:
    """Whether the daemon's state is newer than a checkpoint's: a higher version (its own
    numbering), or built from a later etcd revision. Versions alone miss a daemon whose
    numbering began again (a state dir lost with its pod): its version 1 would lose to a
    checkpoint's 40 and bring back values etcd no longer holds; etcd's revisions are one
    numbering for every daemon and never go back."""
    return daemon.version > checkpoint.version or daemon.revision > checkpoint.revision
