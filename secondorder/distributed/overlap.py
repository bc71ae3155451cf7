"""Gradient all-reduce overlapped with backward: buckets launched as backward fills them.

Backward produces gradients roughly in reverse parameter order, so the parameters are laid out
in that order in flat buckets of about ``bucket_mb`` (the scheme of PyTorch's
DistributedDataParallel, Li et al. 2020, "PyTorch Distributed"). While :meth:`GradientReducer.armed`
is active, a ``post_accumulate_grad`` hook on every parameter marks its gradient final; a bucket
whose gradients are all final is packed and its asynchronous all-reduce launched, while backward
goes on computing the gradients of earlier layers. :meth:`GradientReducer.finish` launches what
is left (parameters backward did not reach: unused ones, or ones whose gradient came from an
earlier micro-batch only), waits for every bucket and writes the averages back into ``.grad``.

Buckets are launched strictly in bucket order on every rank: collectives are matched by their
order (gloo, NCCL) or by generated names (Horovod), so a bucket that filled early waits for the
buckets before it. The hooks exist only while armed, so backward passes outside the gradient
pass (curvature products, sampled-target statistics, line searches) never start a collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from secondorder.distributed.communicator import BUCKET_MB

__all__ = ["GradientReducer", "squared_norm"]


@dataclass
class _Bucket:
    params: list[torch.Tensor]
    final: set[int] = field(default_factory=set)  # positions whose gradient is complete
    flat: torch.Tensor | None = None
    handle: Any = None
    absent: list[bool] = field(default_factory=list)  # no gradient at launch: stays None

    @property
    def full(self) -> bool:
        return len(self.final) == len(self.params)


class GradientReducer:
    """Averages ``p.grad`` over ranks in buckets launched during backward.

    Args:
        comm: the communicator (its ``all_reduce(..., async_op=True)`` is the only call).
        params: the parameters whose gradients are averaged, in model order.
        bucket_mb: bucket size; parameters of another dtype or device start a new bucket.
        measure_local: record :attr:`local_sq_norm`, the squared norm of this rank's gradient
            before it is averaged (read from each bucket just before its launch).
    """

    def __init__(
        self,
        comm: Any,
        params: Sequence[torch.Tensor],
        *,
        bucket_mb: float = BUCKET_MB,
        measure_local: bool = False,
    ):
        self.comm = comm
        self.buckets = [_Bucket(b) for b in _reverse_buckets(params, int(bucket_mb * 2**20))]
        self._where = {
            id(p): (b, i)
            for b, bucket in enumerate(self.buckets)
            for i, p in enumerate(bucket.params)
        }
        self._next = 0  # the first bucket not launched yet
        self.measure_local = measure_local
        self.local_sq_norm: torch.Tensor | None = None

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Hooks that launch buckets as backward completes them, for one backward call."""
        self.comm.stats.begin_interval()
        handles = [
            p.register_post_accumulate_grad_hook(self._on_gradient)
            for bucket in self.buckets
            for p in bucket.params
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _on_gradient(self, param: torch.Tensor) -> None:
        b, i = self._where[id(param)]
        self.buckets[b].final.add(i)
        while self._next < len(self.buckets) and self.buckets[self._next].full:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.absent = [p.grad is None for p in bucket.params]
        bucket.flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in bucket.params
            ]
        )
        if self.measure_local:
            part = squared_norm([bucket.flat])
            self.local_sq_norm = part if self.local_sq_norm is None else self.local_sq_norm + part
        bucket.handle = self.comm.all_reduce(bucket.flat, op="avg", async_op=True)

    def finish(self) -> None:
        """Launch the buckets backward did not complete, wait for all, unpack into ``.grad``."""
        for bucket in self.buckets[self._next :]:
            self._launch(bucket)
        self._next = len(self.buckets)
        for bucket in self.buckets:
            bucket.handle.wait()
            offset = 0
            for p, absent in zip(bucket.params, bucket.absent, strict=True):
                n = p.numel()
                if not absent:
                    p.grad.copy_(bucket.flat[offset : offset + n].view_as(p.grad))
                offset += n


def squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ ‖t‖²`` as a 0-d tensor, in float32 at least (float64 when the tensors are)."""
    total: torch.Tensor | None = None
    for t in tensors:
        flat = t.reshape(-1)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        part = torch.dot(flat, flat)
        total = part if total is None else total + part
    return total if total is not None else torch.zeros(())


def _reverse_buckets(params: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Parameters in reverse order, cut into buckets of at most ``bucket_bytes`` (a larger single
    parameter gets a bucket of its own); a change of dtype or device also cuts."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for p in reversed(list(params)):
        nbytes = p.numel() * p.element_size()
        current = buckets[-1] if buckets else None
        if (
            current is None
            or size + nbytes > bucket_bytes
            or (p.dtype, p.device) != (current[0].dtype, current[0].device)
        ):
            buckets.append([p])
            size = nbytes
        else:
            current.append(p)
            size += nbytes
    return buckets
