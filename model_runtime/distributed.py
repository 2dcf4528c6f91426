"""Step-consistent apply under torch.distributed: every rank, the same values, the same step.

Each rank talks to its own node's daemon, so a change reaches the ranks at
different times, or (a daemon stalled or restarting) late. ``StepSync`` makes
the ranks of one process group agree, with the group's own collectives, on
which received state to apply; it runs in the training thread, inside
``LiveConfig.apply`` (and once in ``LiveConfig.connect``), never in a background
thread.

The protocol, every ``sync_every``-th ``apply`` call (counted in calls: every rank
must call ``apply`` as often as the others, with the same steps):

1. Every rank brings the digest ``d`` of the newest state its daemon sent, its vote
   ``v`` (below) and the step ``s`` passed to this ``apply``, folded into one 63-bit
   fingerprint ``f``, to one ``all_reduce(MIN)`` of ``[f, -f]``. Equal minimum and
   maximum mean every rank brings the same three: each applies its own newest state (or,
   all having voted 2, goes on as below). This is the whole cost in the steady state: one
   collective of two int64 (gloo's time grows with the elements: on 4 ranks, 0.8 ms for
   two against 4.1 for six). When the fingerprints differ, a second ``all_reduce(MIN)``
   of ``[d, -d, v, -v, s, -s]`` tells what differs. Equal ``d`` everywhere mean every
   rank holds the same values. Different steps raise ``ValueError`` on every rank (a
   rank that called ``apply`` more often than the others, see ``check_same_step``).
   ``v`` is a rank's vote on a checkpoint loaded since the last agreement (0: none, 1:
   the checkpoint is newer than this rank's daemon's state, 2: the daemon's is newer).
   If any rank votes 2, every rank takes its daemon's state back from the checkpoint
   and goes on to step 2, so that all end on the same values (each daemon numbers its
   own versions: the ranks can disagree on which is newer, and one that kept the
   checkpoint would hold the others back until the next edit). Some ranks voting 0 and
   others not (a checkpoint loaded on some ranks only) raise ``ValueError`` on every
   rank (``check_loaded_everywhere``).
2. Otherwise (a change is still on its way to some node) the ranks
   ``all_gather`` their newest ``(revision, digest)``. The candidates are the
   newest states of the ranks at the lowest etcd revision, in rank order: the
   newest states that every rank has received or passed. Usually there is one.
   Several (different values at one revision) mean either that a node-local
   edit (a file: the daemon keeps the etcd revision for it) has reached some
   nodes and not others yet, or that the nodes' local layers differ.
3. One ``all_reduce(MIN)`` says, for each candidate, whether every rank still
   holds its values in its history of the last 64 received states. The target
   is the first candidate that every rank holds: each applies its own copy
   (an edit that only some ranks hold waits until every rank does). If every
   rank holds none (a daemon coalesced past the target, or the local layers
   differ: then a warning is logged once), the target is the lowest rank's
   candidate: that rank sends the values with ``broadcast_object_list``, and
   every rank applies those. A rank that applied values from another rank
   acknowledges them at the first agreement on them after its own daemon sent
   the same values, under its daemon's version, with the step they were
   applied at (its daemon's states are held at the restart-only values it runs,
   so a daemon that holds other ones sends the same values too). Until then, if
   its daemon's newest state is at the same etcd revision with other values (the
   local layers differ), it tells its daemon that it runs the agreed values in
   that state's place (``LiveConfig._tell_agreed``), so that ``status`` and
   ``set --wait`` do not take it for a hung process.
   The same collective gives the lowest and highest revision of the states the
   ranks run; the ranks keep those values, and apply nothing, if a rank runs a
   later state than the target (an edit reverted before some ranks got it: the
   ranks run the revert already), or if all run values agreed at the target's
   revision, no rank holds a candidate and some rank is past it (the candidates
   lost to the values run there, or are edits the ranks past it cannot get). A
   loaded checkpoint's revision counts as none here: it may be another etcd's.

Every decision is a function of the collectives' results, so all ranks run the
same collectives and apply the same values, whatever the timing. A rank whose
daemon is away keeps reporting its last state, so the group keeps the last
agreed values and applies nothing newer until every rank holds it.

torch is imported only when a ``StepSync`` is built. Under NCCL the tensors live
on the current CUDA device: call ``torch.cuda.set_device`` before ``connect``.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .collectives import GroupCollectives
from .reporting import step_number

if TYPE_CHECKING:
    from .client import LiveConfig
    from .received import State

log = logging.getLogger("hotknob.model_runtime")

DEFAULT_SYNC_EVERY = 16
"""Calls to ``apply`` between two agreements; see ``docs/distributed.md`` for the figures."""


def choose_source(held: Sequence[tuple[int, int]]) -> int:
    """The group rank whose newest state every rank applies when no rank holds another
    candidate (``candidates``), given each rank's newest.

    ``held[r]`` is rank ``r``'s newest ``(revision, digest)``. etcd revisions are
    global, so the lowest one is the newest state that every rank has reached;
    among equal revisions (node-local layers differ) the lowest rank wins.
    """
    return min(range(len(held)), key=lambda r: (held[r][0], r))


def candidates(held: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ``(rank, digest)`` of each distinct newest state at the lowest revision, in rank
    order: the states every rank has received or passed. The first is ``choose_source``'s."""
    low = min(revision for revision, _ in held)
    found: dict[int, int] = {}
    for rank, (revision, digest) in enumerate(held):
        if revision == low:
            found.setdefault(digest, rank)
    return [(rank, digest) for digest, rank in found.items()]


class StepSync:
    """The collectives behind a distributed ``LiveConfig``; built by ``LiveConfig.connect``.

    Raises ``ValueError`` if torch.distributed is not initialised or if this process
    is not in ``group``; and, after one collective (``check_same_settings``), on every
    rank if any rank's ``sync_every`` is not a positive integer or the ranks were given
    different ones: their agreements would fall on different ``apply`` calls.
    """

    def __init__(self, group: Any = None, sync_every: int | None = None) -> None:
        every = DEFAULT_SYNC_EVERY if sync_every is None else sync_every
        invalid = isinstance(every, bool) or not isinstance(every, int) or every < 1
        self._ops = GroupCollectives(group, 0 if invalid else every)
        # Refused in ``check_same_settings``, after its collective: raised here, on this
        # rank alone, it would leave the other ranks waiting in theirs.
        self._invalid = ""
        if invalid:
            self._invalid = f"sync_every must be an integer >= 1, not {sync_every!r}"
            every = 0
        self.sync_every = every
        self._countdown = every
        self._warned: set[int] = set()
        self._vote = 0  # on a checkpoint loaded since the last agreement (see the module doc)
        # The loaded checkpoint's state, which the ranks run until they apply another: its
        # revision may be another etcd's, so it orders nothing here.
        self._checkpoint: State | None = None
        # The group rank whose values this rank last installed unacknowledged, if any
        # (``LiveConfig._tell_agreed``: an agreement that keeps them says so again to a
        # daemon that sent a state since, or was restarted).
        self._source: int | None = None

    def check_same_settings(self) -> None:
        """One collective: ``ValueError`` on every rank unless all have this ``sync_every``,
        and it is valid (an invalid one counts as 0 in the collective)."""
        low, neg_high = self._ops.min([self.sync_every, -self.sync_every])
        if self._invalid:
            raise ValueError(self._invalid)
        if low < 1:
            raise ValueError(
                "another rank was given a sync_every that is not an integer >= 1: every "
                "rank must pass the same one"
            )
        if low != -neg_high:
            raise ValueError(
                f"the ranks were given different sync_every (from {low} to {-neg_high}): "
                "every rank must pass the same, or their agreements fall on different steps"
            )

    def client_name(self, name: str) -> str:
        """``name`` ending in ``-rankN``, so the ranks sharing a daemon stay apart in status."""
        suffix = f"-rank{self._ops.rank}"
        return name if name.endswith(suffix) else name + suffix

    def hello_fields(self) -> dict[str, int]:
        return {"rank": self._ops.rank, "world_size": self._ops.world_size}

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is True on every rank (one collective)."""
        return self._ops.min([1 if flag else 0])[0] == 1

    def ranks_without(self, flag: bool) -> list[int]:
        """The global ranks where ``flag`` is False (one collective, on every rank)."""
        flags = self._ops.gather_ints(1 if flag else 0)
        return [self._ops.global_rank(r) for r, f in enumerate(flags) if not f]

    def loaded(self, state: State, *, newer: bool) -> None:
        """A checkpoint was loaded (``state``, now the applied one); ``newer`` if this
        rank's daemon had sent a newer state. The ranks decide at the next agreement."""
        self._vote = max(self._vote, 2 if newer else 1)
        self._checkpoint = state

    def at_step(self, live: LiveConfig, step: int) -> bool:
        """``LiveConfig.apply`` under a group: a countdown, and an agreement when it runs out."""
        self._countdown -= 1
        if self._countdown > 0:
            return False
        self._countdown = self.sync_every
        with self.uncounted():
            return self.agree(live, step)

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Calls of ``apply`` made inside (an ``on_change`` callback's, during an agreement
        or a checkpoint load: refused, or a no-op) leave the countdown as it was. They are
        not the loop's: counted, on the ranks whose callbacks make them, they would move
        those ranks' agreements one call off the others', to meet another collective
        (DDP's) there, or to apply a change at another call than the others."""
        countdown = self._countdown
        try:
            yield
        finally:
            self._countdown = countdown

    def agree(self, live: LiveConfig, step: int) -> bool:
        """Run the protocol now and apply the agreed state; True if one was applied.

        ``RuntimeError``, before any collective, if an apply of ``live`` is running (see
        ``LiveConfig.apply``)."""
        live._begin_apply()
        try:
            return self._agree(live, step)
        finally:
            live._end_apply()

    def _agree(self, live: LiveConfig, step: int) -> bool:
        newest = live._latest
        assert newest is not None, "agree() before the first state"
        my_step = _step_pair(step)
        # The steady state: one collective of two int64, the fingerprint of what this rank
        # brings; equal everywhere, every rank brings the same digest, vote and step.
        low, neg_high = self._ops.min(_fold(newest.digest, self._vote, my_step[0]))
        if low == -neg_high:
            same, high_vote = True, self._vote
        else:  # something differs: the whole of it, to tell what and to decide
            low, neg_high, low_vote, neg_vote, low_step, neg_high_step = self._ops.min(
                [newest.digest, -newest.digest, self._vote, -self._vote, *my_step]
            )
            check_same_step(low_step, -neg_high_step)
            check_loaded_everywhere(low_vote, -neg_vote)
            same, high_vote = low == -neg_high, -neg_vote
        self._vote = 0
        if high_vote == 2:  # a daemon is newer than the loaded checkpoint somewhere
            live._take_back_superseded()
            newest = live._latest
            assert newest is not None
        elif same:
            return self._install(live, newest, step, ack=True)
        held = self._ops.gather_pairs(newest.revision, newest.digest)
        options = candidates(held)
        source, digest = options[0]
        revision = held[source][0]
        history = live._received_states()
        copies = [newest if newest.digest == d else _find(history, d) for _, d in options]
        # With the flags, the lowest and highest revision of the states the ranks run; a
        # checkpoint's counts as 0: saved against another etcd (a move, a restore), its
        # revision may be above any this one holds, and would hold back every edit.
        applied = 0 if live._applied is self._checkpoint else live._applied.revision
        *everyone, low_applied, neg_high_applied = self._ops.min(
            [0 if c is None else 1 for c in copies] + [applied, -applied]
        )
        if -neg_high_applied > revision:
            # A rank runs a later state (the same values as the others: an edit reverted
            # before some ranks got it, the revert acknowledged): going back would reorder.
            self._tell_agreed(live)
            return False
        for held_by_all, copy in zip(everyone, copies, strict=True):
            if held_by_all:
                assert copy is not None
                return self._install(live, copy, step, ack=True)
        if low_applied == revision and any(r > revision for r, _ in held):
            # The values run were agreed at this revision, and the ranks still at it hold
            # values that lost to them there (local layers differ) or an edit that the
            # ranks past it can no longer get: keep them until those ranks move on.
            self._tell_agreed(live)
            return False
        mine = copies[0]
        disagree = len(options) > 1 and revision == newest.revision and digest != newest.digest
        if disagree and digest not in self._warned:
            self._warned.add(digest)
            log.warning(
                "live_ranks_disagree revision=%d: daemons hold different values at one "
                "etcd revision and no rank holds the others' (node-local layers "
                "differ?); rank %d's values win",
                revision,
                self._ops.global_rank(source),
            )
        payload = self._broadcast(mine, source)
        if mine is not None:
            return self._install(live, mine, step, ack=True)
        from .received import State

        state = State.build(payload["version"], payload["revision"], payload["values"])
        changed = self._install(live, state, step, ack=False)
        self._source = source
        self._tell_agreed(live)
        return changed

    def _tell_agreed(self, live: LiveConfig) -> None:
        """This rank runs the values it installed from another rank, ``_source``: if its
        daemon's newest state holds them (``LiveConfig._adopt``: once held at the
        restart-only values run, ``RestartOnlyHold.hold``), acknowledge that state; else
        tell its daemon that it runs them in that state's place (``LiveConfig._tell_agreed``,
        which does nothing if it was told, or the values were acknowledged since). Also when
        the ranks keep those values: its daemon may have sent a state since, or restarted."""
        source = self._source
        if source is None:
            return
        newest = live._latest
        if newest is not None and live._adopt(newest):
            return
        live._tell_agreed(self._ops.global_rank(source))

    @staticmethod
    def _install(live: LiveConfig, state: State, step: int, *, ack: bool) -> bool:
        """Apply ``state`` unless it is what is applied; ``ack`` if this rank's daemon sent
        it. True if the values changed: the same on every rank, since every rank held the
        same agreed values before and holds them after.

        The same values, applied unacknowledged from another rank, are acknowledged now
        (``LiveConfig._adopt``), at the step they were applied. The same values under
        another version or revision (this rank's daemon restarted and renumbered its
        state) are taken in and acknowledged, also at the step they were applied, and
        count as no change: a rank whose daemon did not restart sees none, and ``apply``
        must not return True on some ranks only (a training loop may enter a collective
        on it)."""
        applied = live._applied
        if state is applied:
            return False
        if state.digest == applied.digest:
            if ack and live._adopt(state):
                return False
            if state.version != applied.version or state.revision != applied.revision:
                live._renumbered(state, ack=ack)
            return False
        live._apply_state(state, step, ack=ack)
        return True

    def _broadcast(self, mine: State | None, source: int) -> dict[str, Any]:
        """The group rank ``source``'s state (``mine`` there) as a message's fields, on
        every rank."""
        from .received import thaw

        sent: dict[str, Any] | None = None
        if self._ops.group_rank == source:
            assert mine is not None
            sent = {
                "version": mine.version,
                "revision": mine.revision,
                "values": thaw(mine.values),
            }
        result: dict[str, Any] = self._ops.broadcast(sent, source)
        return result


_NO_STEP = 2**63 - 1
"""A step that is no integer counts as this in both entries of ``_step_pair``: the largest
int64, which neither minimum takes while another rank passes an integer."""


def _step_pair(step: Any) -> list[int]:
    """``[s, -s]`` for the agreement's ``all_reduce(MIN)``, which then gives the lowest and
    (negated) highest step the ranks passed; ``[_NO_STEP] * 2`` for a step that is no integer
    (``LiveConfig.apply`` logs it at the apply), which is left out of the comparison."""
    try:
        number = step_number(step)  # also bounds a plain int: the tensor holds an int64
    except (TypeError, ValueError):
        return [_NO_STEP, _NO_STEP]
    return [number, -number]


def check_same_step(low: int, high: int) -> None:
    """``ValueError`` unless every rank passed the same step to the ``apply`` call that ran
    this agreement (``low``/``high``: the lowest and highest integer step; ``low > high``
    when no rank passed one). Run on every rank with the collective's result, so all raise.

    Different steps at one agreement mean ranks that count their steps differently, or, far
    more often, one that called ``apply`` more or fewer times than the others: its
    agreements then meet the others' at other calls, or another collective. Each rank would
    also acknowledge the change at its own step, and ``status`` and guards place it there."""
    if low < high:
        raise ValueError(
            f"apply() was given different steps on the ranks at one agreement (from {low} "
            f"to {high}): every rank must call apply() as often as the others, each time "
            "with the same step"
        )


def check_loaded_everywhere(low_vote: int, high_vote: int) -> None:
    """``ValueError`` if some ranks loaded a checkpoint since the last agreement and others
    did not (``low_vote``/``high_vote``: the lowest and highest vote). Run on every rank
    with the collective's result, so all raise.

    The ranks would no longer run the same values, and the agreement, which starts from
    values every rank shares, could not bring them back together at one call: ``apply``
    would return True on the ranks that loaded and False on the others."""
    if low_vote == 0 < high_vote:
        raise ValueError(
            "load_state_dict() was called on some ranks only since the last agreement: "
            "call it on every rank, with the same checkpoint, between the same apply() calls"
        )


def _fold(digest: int, vote: int, step: int) -> list[int]:
    """``[f, -f]``: ``f`` a 63-bit fingerprint of a rank's digest, vote and step (the first of
    ``_step_pair``), the same on every host for the same three. Equal minimum and maximum of
    ``f`` over the ranks mean all brought the same three, as the digest alone says the same
    values (``digest_of``, whose odds of a collision these share)."""
    packed = struct.pack("<qqq", digest, vote, step)
    fingerprint = int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "big") >> 1
    return [fingerprint, -fingerprint]


def _find(states: Sequence[State], digest: int) -> State | None:
    """The newest of ``states`` with these values, else None."""
    for state in reversed(states):
        if state.digest == digest:
            return state
    return None
