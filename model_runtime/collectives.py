"""The ranks' agreement's collectives on torch.distributed, in Python ints.

``distributed.StepSync`` decides which received state the ranks apply from the results
of a few collectives: an ``all_reduce(MIN)`` of some ints, an ``all_gather`` of one or
two ints a rank, and, when no rank holds the values the others need, a
``broadcast_object_list`` of them from one rank. ``GroupCollectives`` runs those on the
process group: it checks that torch.distributed is up and that this process is in the
group, puts the ints on the group's device (the current CUDA device under NCCL, else the
CPU), reads the results back as Python ints, maps a group rank to its global rank, and
adds to a collective's failure what it was for.

Apart from ``distributed`` because none of it decides anything: there, the agreement
reads as its rules over ints; here, the calls of torch.distributed, their tensors and
their devices. torch is imported only when a ``GroupCollectives`` is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class GroupCollectives:
    """The collectives of one process group (``group``; None: the default one), built by
    ``StepSync``; ``sync_every`` only goes into what a failed collective says.

    Raises ``ValueError`` if torch.distributed is not initialised or if this process
    is not in ``group``.
    """

    def __init__(self, group: Any, sync_every: int) -> None:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed apply needs an initialised torch.distributed process group: "
                "call torch.distributed.init_process_group() before LiveConfig.connect()"
            )
        self._torch = torch
        self._dist = dist
        self._group = group
        self.group_rank = dist.get_rank(group)
        if self.group_rank < 0:
            raise ValueError("this process is not a member of the given process_group")
        self.group_size = dist.get_world_size(group)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._sync_every = sync_every
        nccl = str(dist.get_backend(group)) == "nccl"
        self._device = (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        )

    def global_rank(self, group_rank: int) -> int:
        """The global rank of the group's rank ``group_rank``: what client names and
        ``status`` say (``-rankN``), also under a ``process_group`` of some ranks."""
        if self._group is None:
            return group_rank
        return int(self._dist.get_global_rank(self._group, group_rank))

    # -- collectives: tensors on the group's device, results as Python ints ---------------

    @contextmanager
    def _explained(self) -> Iterator[None]:
        """Add to a collective's failure (the backend's timeout, a peer gone) which collective
        it was and what to check: the backend's own text names neither hotknob nor ``apply``,
        and the usual cause, a rank that called ``apply`` fewer times or died, is elsewhere.
        The exception keeps its type, for code that handles the backend's errors."""
        try:
            yield
        except Exception as exc:
            exc.add_note(
                f"hotknob: rank {self.rank} was in the ranks' agreement on live config "
                f"(LiveConfig.connect, or apply every {self._sync_every} calls) when it failed: "
                "another rank did not reach it in the process group's timeout (it called "
                "apply() fewer times than this one, is stuck, or died: see its log)"
            )
            raise

    def _tensor(self, values: list[int]) -> Any:
        return self._torch.tensor(values, dtype=self._torch.int64).to(self._device)

    def min(self, values: list[int]) -> list[int]:
        """Each of ``values``' minimum over the ranks (``all_reduce(MIN)``)."""
        tensor = self._tensor(values)
        with self._explained():
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MIN, group=self._group)
        return [int(v) for v in tensor.tolist()]

    def gather_ints(self, value: int) -> list[int]:
        """Each rank's ``value``, in group rank order."""
        mine = self._tensor([value])
        parts = [self._torch.empty_like(mine) for _ in range(self.group_size)]
        with self._explained():
            self._dist.all_gather(parts, mine, group=self._group)
        return [int(p[0]) for p in parts]

    def gather_pairs(self, first: int, second: int) -> list[tuple[int, int]]:
        """Each rank's ``(first, second)``, in group rank order."""
        mine = self._tensor([first, second])
        parts = [self._torch.empty_like(mine) for _ in range(self.group_size)]
        with self._explained():
            self._dist.all_gather(parts, mine, group=self._group)
        return [(int(p[0]), int(p[1])) for p in parts]

    def broadcast(self, sent: Any, source: int) -> Any:
        """The object the group rank ``source`` passes as ``sent``, on every rank
        (``broadcast_object_list``; the other ranks pass None)."""
        payload: list[Any] = [sent]
        with self._explained():
            self._dist.broadcast_object_list(
                payload, group=self._group, group_src=source, device=self._device
            )
        return payload[0]
