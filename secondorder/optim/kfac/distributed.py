"""The collectives of synchronous distributed K-FAC, all through the project's communicator.

- Factor statistics (Ba, Grosse & Martens 2017, section 3): at factor-update steps each rank's
  batch SUMS and row/example counts are summed over ranks in buckets
  (``comm.all_reduce_tensors``), sending only the upper triangle of each symmetric sum; the
  global batch average is then ``Σ_ranks sums / Σ_ranks counts`` (exact also for unequal
  local batches, and for a layer some rank did not run).
- Decompositions / preconditioned gradients: every rank's results travel in ONE flat buffer per
  owner and dtype, broadcast from the owner (``comm.broadcast``), all broadcasts in flight at
  once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["broadcast_from_owners", "reduce_sums"]

_TRIU: dict[tuple[int, torch.device], Tensor] = {}


def _triu(n: int, device: torch.device) -> Tensor:
    key = (n, device)
    if key not in _TRIU:
        _TRIU[key] = torch.triu_indices(n, n, device=device)
    return _TRIU[key]


def reduce_sums(comm: Any, sums: Sequence[Tensor], counts: Tensor, *, bucket_mb: float) -> None:
    """Sum symmetric matrices ``sums`` and the ``counts`` tensor over ranks, in place.

    Only the upper triangle of each matrix is communicated; the result is symmetric.
    """
    if comm is None or comm.world_size == 1:
        return
    packed = []
    for matrix in sums:
        rows, cols = _triu(matrix.shape[0], matrix.device)
        packed.append(matrix[rows, cols])
    comm.all_reduce_tensors([*packed, counts], op="sum", bucket_mb=bucket_mb)
    for matrix, values in zip(sums, packed, strict=True):
        rows, cols = _triu(matrix.shape[0], matrix.device)
        matrix[rows, cols] = values
        matrix[cols, rows] = values


def broadcast_from_owners(
    comm: Any,
    owners: Sequence[int],
    local: dict[int, Sequence[Tensor]],
    shapes: Sequence[Sequence[torch.Size]],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> list[list[Tensor]]:
    """Every rank gets item ``j``'s tensors, computed on rank ``owners[j]``.

    Args:
        comm: the communicator (``None``: one process; ``local`` must hold every item).
        owners: owner rank of every item.
        local: this rank's items (index -> tensors of ``shapes[index]``).
        shapes: the tensor shapes of every item (known on every rank).
        dtype: dtype of every tensor.
        device: device of the buffers.

    Returns:
        For every item, its tensors (views into the received buffers on non-owners).
    """
    world = 1 if comm is None else comm.world_size
    if world == 1:
        return [list(local[j]) for j in range(len(owners))]
    rank = comm.rank
    pending = []
    for owner in range(world):
        items = [j for j, r in enumerate(owners) if r == owner]
        if not items:
            continue
        if owner == rank:
            flat = torch.cat([t.reshape(-1).to(dtype) for j in items for t in local[j]])
        else:
            size = sum(_numel(shape) for j in items for shape in shapes[j])
            flat = torch.empty(size, dtype=dtype, device=device)
        pending.append((comm.broadcast(flat, src=owner, async_op=True), flat, items))
    result: list[list[Tensor]] = [[] for _ in owners]
    for handle, flat, items in pending:
        handle.wait()
        if owners[items[0]] == rank:  # the owner keeps its own tensors
            for j in items:
                result[j] = list(local[j])
            continue
        offset = 0
        for j in items:
            for shape in shapes[j]:
                n = _numel(shape)
                result[j].append(flat[offset : offset + n].view(shape))
                offset += n
    return result


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
