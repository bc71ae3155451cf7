"""The communicator interface: what optimizers and the trainer call instead of collectives.

Optimizers and the trainer receive a :class:`Communicator` and call its methods; they never call
collective libraries themselves. ``NoComm`` is world size 1 with every collective a no-op, so
library code written against the interface runs unchanged in a plain single-process loop. The
backends (:mod:`.torch_comm`, :mod:`.horovod_comm`) override the collectives; :mod:`.comm`
picks one for the launcher that started the process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch

from secondorder.distributed.comm_stats import STATS_ENV, CommStats, parameter_fingerprint

__all__ = ["Communicator", "Done", "NoComm", "Op", "ParameterDivergence"]

Op = Literal["avg", "sum"]


class Done:
    """A handle for work that already finished (single process, or a synchronous fallback)."""

    def wait(self) -> None:
        return None


#: Default size of the buckets tensors are packed into for one collective (gradients, factors,
#: curvature-vector products): large enough to amortise a collective's latency, small enough to
#: start early. Every bucketed call in the package defaults to it.
BUCKET_MB = 25.0


class Communicator:
    """Interface every backend implements. World size 1 semantics are the default bodies."""

    backend: str = "none"
    # Backends set these from their launcher; the defaults are one process.
    _rank: int = 0
    _local_rank: int = 0
    _world: int = 1

    @property
    def stats(self) -> CommStats:
        """This communicator's own counters (never shared with another instance)."""
        if "_stats" not in self.__dict__:
            self._stats = CommStats()
        return self._stats

    @stats.setter
    def stats(self, value: CommStats) -> None:
        self._stats = value

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, *, op: Op = "avg", async_op: bool = False):
        """Reduce ``tensor`` in place across ranks; returns a handle when ``async_op``."""
        return Done() if async_op else None

    def broadcast(self, tensor: torch.Tensor, *, src: int = 0, async_op: bool = False):
        """Copy ``src``'s tensor into every rank's ``tensor`` in place."""
        return Done() if async_op else None

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor``, in rank order."""
        return [tensor.clone()]

    def broadcast_object(self, obj: Any, *, src: int = 0) -> Any:
        """A picklable object from ``src`` on every rank."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order."""
        return [obj]

    def barrier(self) -> None:
        return None

    def all_reduce_tensors(
        self, tensors: Sequence[torch.Tensor], *, op: Op = "avg", bucket_mb: float = BUCKET_MB
    ) -> None:
        """All-reduce many tensors in place, packed into flat buckets of about ``bucket_mb``.

        One collective per bucket instead of one per tensor; tensors of different dtypes or
        devices go to different buckets.
        """
        if self.world_size == 1:
            return
        bucket_bytes = int(bucket_mb * 2**20)
        pending: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []
        for bucket in _buckets(tensors, bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            pending.append((self.all_reduce(flat, op=op, async_op=True), flat, bucket))
        for handle, flat, bucket in pending:
            handle.wait()
            offset = 0
            for t in bucket:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    def all_reduce_gradients(self, params: Iterable[torch.Tensor], *, bucket_mb: float = BUCKET_MB):
        """Average ``p.grad`` over ranks for every parameter that has one.

        Packed in reverse parameter order, the buckets the overlapped path
        (:mod:`secondorder.distributed.overlap`) launches during backward: both paths then sum
        the same elements in the same places, and their results are equal on any number of
        ranks, not only to rounding."""
        self.stats.begin_interval()
        grads = [p.grad for p in params if p.grad is not None]
        self.all_reduce_tensors(grads[::-1], op="avg", bucket_mb=bucket_mb)

    def broadcast_parameters(self, tensors: Iterable[torch.Tensor], *, src: int = 0) -> None:
        """Make every rank start from ``src``'s values (parameters and buffers)."""
        if self.world_size == 1:
            return
        handles = [self.broadcast(t.data, src=src, async_op=True) for t in tensors]
        for h in handles:
            h.wait()

    def verify_parameters(self, tensors: Iterable[torch.Tensor], *, step: int = -1) -> None:
        """Fail loudly when ranks hold different parameters (``distributed.verify_every``).

        Every rank gathers a float64 fingerprint of its tensors (per tensor: the sum and the sum
        weighted by position, so a swap or a single changed element shows) and compares it with
        rank 0's bitwise: data-parallel ranks apply identical updates to identical weights.
        One host synchronisation per call.
        """
        if self.world_size == 1:
            return
        fingerprint = parameter_fingerprint(tensors)
        gathered = self.all_gather(fingerprint)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, gathered[0]):
                diff = (other - gathered[0]).abs().max().item()
                raise ParameterDivergence(
                    f"parameters differ between rank 0 and rank {rank}"
                    + (f" at step {step}" if step >= 0 else "")
                    + f" (largest fingerprint difference {diff:.3g}); the ranks no longer "
                    "train the same model"
                )

    def dump_stats(self) -> None:
        """Write ``comm_stats.rank<r>.json`` into ``$SECONDORDER_COMM_STATS`` when it is set."""
        folder = os.environ.get(STATS_ENV)
        if not folder or self.world_size == 1:
            return
        os.makedirs(folder, exist_ok=True)
        record = {"backend": self.backend, "rank": self.rank, "world_size": self.world_size}
        record.update(self.stats.as_dict())
        path = os.path.join(folder, f"comm_stats.rank{self.rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    def shutdown(self) -> None:
        return None


class ParameterDivergence(RuntimeError):
    """Ranks of a data-parallel run hold different parameters."""


class NoComm(Communicator):
    """World size 1; every collective is a no-op and no process group exists."""

    backend = "none"


def _buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    for t in tensors:
        key = (t.dtype, t.device)
        lists = groups.setdefault(key, [[]])
        current = lists[-1]
        size = sum(x.numel() * x.element_size() for x in current)
        if current and size + t.numel() * t.element_size() > bucket_bytes:
            current = []
            lists.append(current)
        current.append(t)
    return [b for lists in groups.values() for b in lists if b]
