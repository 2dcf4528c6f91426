"""What the processes' status entries say, read back by those that did not write them.

The status publisher (``status.py``) writes each connected process's entry, one at a
time, as its daemon learns of it. Everything else reads them: a guarded ``set`` (the
processes and their baselines), ``set --wait`` and ``status`` (who runs what, who
refused it, who waits for a restart), and each daemon's guards (the processes of other
daemons: whether they are still inside a guard's window, will ever apply the change, or
can judge it at all). An entry may have been written by another hotknob, or around
hotknob: every reader here takes a field only in the shape hotknob writes it, and an
entry that is not a JSON object is no entry. Kept apart from the publisher so that the
readers need neither its thread nor its lease, and so that what a field means to them
is said in one place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, TypeGuard

from hotknob.config.keys import status_prefix

from .etcd_store import EtcdStore


def status_name(node: str, client: str) -> str:
    """A process's name under the status prefix, ``<node>/<client>``: a ``/`` in the client's
    name is written ``_``, so that the name is one level below the node's.

    The baselines a guarded ``set`` stores are keyed by it, so guards look them up by it.
    """
    return f"{node}/{client.replace('/', '_')}"


# --- the processes' status entries, as a guarded ``set`` reads them ---------------------------


def read_status_entries(store: EtcdStore, app: str) -> dict[str, dict[str, Any]]:
    """The status entries of ``app``'s processes by name (``<node>/<client>``); one that
    is not a JSON object (written around hotknob) is left out."""
    kvs, _ = store.read_prefix(status_prefix(app))
    return status_entries(app, kvs)


def status_entries(
    app: str, kvs: Mapping[str, bytes], skipped: Callable[[str], object] | None = None
) -> dict[str, dict[str, Any]]:
    """``read_status_entries`` of keys and values read (or watched) under the prefix, in
    the order of their names; ``skipped`` is told the name of each one left out."""
    prefix = status_prefix(app)
    entries: dict[str, dict[str, Any]] = {}
    for key, raw in sorted(kvs.items()):
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            entries[key[len(prefix) :]] = entry
        elif skipped is not None:
            skipped(key[len(prefix) :])
    return entries


# --- what an entry says, to the guards, ``status`` and ``set --wait`` ------------------------


def _others(
    kvs: Mapping[str, bytes], prefix: str, node: str, mine: Collection[str] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The status entries under ``prefix`` of other daemons' processes, by name
    (``<node>/<client>``), decoded; this daemon's own are left out (it knows them exactly).

    Its own are those of ``mine`` (the names of its connected processes) where given, else
    those of its ``node``. Two daemons of one app may share a node name (two on one host,
    where ``--node`` defaults to the host's name): each that took the other's processes
    for its own passed a guard while a process of the other was still inside its window."""
    for key, raw in sorted(kvs.items()):
        name = key[len(prefix) :]
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        owner = entry.get("node")
        if mine is not None:
            if name in mine:
                continue
        elif owner == node or (not isinstance(owner, str) and name.startswith(node + "/")):
            continue
        yield name, entry


def remote_open_windows(
    kvs: Mapping[str, bytes],
    prefix: str,
    node: str,
    guard_id: str,
    revision: int,
    keys: Collection[str] = (),
    mine: Collection[str] | None = None,
) -> tuple[list[str], list[str]]:
    """The processes of other daemons (status entries under ``prefix``) whose window of
    guard ``guard_id`` (guarding ``revision``, a change of the dotted ``keys``) is not
    done, as their own daemon says in their entry (``GuardManager.windows_of``), by name
    (``<node>/<client>``): those that reported what the guard reads since the change
    reached them (still inside their window), and those that have not yet.

    The second list also has the processes whose entry shows no window of the guard yet,
    unless they will never apply the change (``never_applies``: their daemon refused it,
    or holds every one of its keys in a layer above etcd) or run it already
    (``unchanged_by``: it altered no value in force there): the change may not have
    reached them, or their daemon not yet published the window (the change and the
    guard's record come on two watches, and a loaded machine publishes late). The
    caller waits only for those the guard expects to hear from
    (``ArmedGuard.awaited_remote``), and for a while: without them, a guard passed on
    this daemon's processes within a tenth of a second while another node's process, 50
    times the loss, had not been heard of yet. ``mine``: this daemon's processes, by
    name (``_others``)."""
    inside: list[str] = []
    unheard: list[str] = []
    for name, entry in _others(kvs, prefix, node, mine):
        windows = entry.get("guards")
        window = windows.get(guard_id) if isinstance(windows, dict) else None
        if window is None:
            if not never_applies(entry, revision, keys) and not unchanged_by(entry, revision):
                unheard.append(name)
            continue
        if not isinstance(window, dict) or window.get("done") is True:
            continue  # done on its daemon
        (inside if window.get("reported") is True else unheard).append(name)
    return inside, unheard


def refusal(rejected: Any, revision: int) -> Mapping[str, Any] | None:
    """A status entry's ``rejected`` field, if it is of etcd's ``revision`` or later: its
    daemon refused that change, or one after it, and runs without it now. Its refusals
    cleared since (``rejected_before``) do not count here: the guards ask whether a
    process will still apply a state at the change or past it, and one whose daemon took
    a later revision of the refused keys will (its guard watches it from then on)."""
    if isinstance(rejected, Mapping) and is_int(rejected.get("revision")):
        return rejected if rejected["revision"] >= revision else None
    return None


def never_applies(entry: Mapping[str, Any], revision: int, keys: Collection[str] = ()) -> bool:
    """Whether ``entry``'s process will never apply the change of the dotted ``keys`` at
    etcd's ``revision``, as its daemon says: it refused that revision or a later one
    (``rejected``), or a layer above etcd (env, ``--set``) holds every one of the keys
    there (``pinned``), so that no state comes for it."""
    if refusal(entry.get("rejected"), revision) is not None:
        return True
    pinned = entry.get("pinned")
    return (
        bool(keys)
        and isinstance(pinned, Mapping)
        and all(pinned_by(pinned, k) is not None for k in keys)
    )


def pinned_by(pinned: Mapping[str, Any], key: str) -> str | None:
    """The layer above etcd that holds ``key`` on a daemon, as its processes' ``pinned``
    says: one that gives the key itself or a value it lies inside (``weights`` given whole
    holds ``weights.head``); None if none does, or the entry says no layer."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        layer = pinned.get(".".join(parts[:end]))
        if layer is not None:
            return layer if isinstance(layer, str) else None
    return None


def unchanged_by(entry: Mapping[str, Any], revision: int) -> bool:
    """Whether etcd's ``revision`` altered no value in force for ``entry``'s process, as its
    daemon says: the process runs that revision's configuration (``revision``) with a
    state built before it (``built``), so no new state comes for it. A daemon restarted
    since builds a new state: its processes are waited for until it arms the guard."""
    applied, built = entry.get("revision"), entry.get("built")
    return is_int(applied) and is_int(built) and built < revision <= applied


def remote_watching(
    kvs: Mapping[str, bytes],
    prefix: str,
    node: str,
    guard_id: str,
    revision: int,
    keys: Collection[str] = (),
    mine: Collection[str] | None = None,
) -> list[str]:
    """The processes of other daemons (status entries under ``prefix``) that may still
    judge guard ``guard_id`` (guarding revision ``revision``, a change of the dotted
    ``keys``), by name: watched by it on their daemon (their entry lists it, done or not:
    their daemon ends it), or not yet at the change (their entry's revision is below it:
    they may apply it at their next step), unless they never will (``never_applies``).
    While there are any, this daemon does not end the guard as abandoned. One whose
    window its daemon calls ``unjudged`` (past its end with no report of what the guard
    reads) cannot judge it: left out, or two daemons whose processes are all so would
    each leave the guard to the other. ``mine``: this daemon's processes (``_others``)."""
    found = []
    for name, entry in _others(kvs, prefix, node, mine):
        window = _window(entry, guard_id)
        applied = entry.get("revision")
        if (window is not None and window.get("unjudged") is not True) or (
            is_int(applied) and applied < revision and not never_applies(entry, revision, keys)
        ):
            found.append(name)
    return found


def remote_unjudged(
    kvs: Mapping[str, bytes],
    prefix: str,
    node: str,
    guard_id: str,
    mine: Collection[str] | None = None,
) -> list[str]:
    """The processes of other daemons whose window of guard ``guard_id`` their daemon calls
    ``unjudged`` in their entry, by name: an ending's outcome names them. ``mine``: this
    daemon's processes (``_others``)."""
    return [
        name
        for name, entry in _others(kvs, prefix, node, mine)
        if (window := _window(entry, guard_id)) is not None and window.get("unjudged") is True
    ]


def _window(entry: Mapping[str, Any], guard_id: str) -> Mapping[str, Any] | None:
    """What ``entry`` says of its process's window of guard ``guard_id``, if anything."""
    windows = entry.get("guards")
    window = windows.get(guard_id) if isinstance(windows, dict) else None
    return window if isinstance(window, dict) else None


def refused_here(
    kvs: Mapping[str, bytes], prefix: str, node: str, clients: Collection[str], revision: int
) -> set[str]:
    """Those of ``clients``, processes of daemon ``node``, whose status entry under
    ``prefix`` says that their daemon refused etcd's ``revision`` or a later one. A
    daemon's guards learn of its own refusals only so, from what it published."""
    found = set()
    for client in clients:
        raw = kvs.get(prefix + status_name(node, client))
        try:
            entry = json.loads(raw) if raw is not None else None
        except ValueError:
            continue
        if isinstance(entry, dict) and never_applies(entry, revision):
            found.add(client)
    return found


def waiting_for_restart(entry: Mapping[str, Any]) -> set[str]:
    """The restart-only keys ``entry``'s process runs as it started, their new value waiting
    for a restart: held back by its daemon (``restart_pending``) or by the process
    itself (``held``, after its daemon restarted alone). Its daemon lists neither for a
    key the process runs at the value wanted (``feedback.ClientFeedback._waiting``)."""
    return {
        str(key)
        for name in ("restart_pending", "held")
        if isinstance(entry.get(name), list)
        for key in entry[name]
    }


def agreed_rank(entry: Mapping[str, Any]) -> int | None:
    """The rank whose values ``entry``'s process runs in place of its daemon's (``agreed``:
    the ranks of a torch.distributed group agreed on them, and its daemon holds others at
    that etcd revision), if it said so in its ack."""
    agreed = entry.get("agreed")
    rank = agreed.get("rank") if isinstance(agreed, Mapping) else None
    return rank if is_int(rank) else None


def agreed_text(rank: int) -> str:
    """What ``status`` and ``set --wait`` say of a process that runs rank ``rank``'s values
    (``agreed_rank``)."""
    why = "its daemon's differ: node-local layers differ?"
    return f"runs the values agreed with rank {rank} ({why})"


def is_int(value: Any) -> TypeGuard[int]:
    """An integer field of a status entry (written by anyone: ``true`` is no integer)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_time(value: Any) -> TypeGuard[int | float]:
    """A time field of a status entry (seconds since the epoch): a finite number."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
