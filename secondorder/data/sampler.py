"""Global-batch sampling: which examples each rank and micro-batch sees at a given step.

The order is a pure function of ``(seed, epoch)``: every rank draws the same permutation of the
training set for an epoch, cuts it into global batches (the last incomplete one is dropped) and
takes its own contiguous, disjoint slice of each. Nothing is stored between steps, so the
data-order position of a checkpoint is just the step number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secondorder.data.core import DataError


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: ``world_size x micro_batch x accumulation_steps``."""

    global_batch: int
    world_size: int
    micro_batch: int
    accumulation_steps: int

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accumulation_steps


def plan_batches(*, global_batch: int, world_size: int, max_micro_batch: int) -> BatchPlan:
    """Choose the largest micro-batch not above ``max_micro_batch`` that divides the rank share.

    Raises:
        ValueError: when the global batch does not split evenly over the ranks.
    """
    if global_batch <= 0 or world_size <= 0 or max_micro_batch <= 0:
        raise ValueError(
            f"batch sizes must be positive: global_batch={global_batch}, "
            f"world_size={world_size}, max_micro_batch={max_micro_batch}"
        )
    if global_batch % world_size:
        raise ValueError(f"data.batch_size={global_batch} does not divide over {world_size} ranks")
    per_rank = global_batch // world_size
    accumulation = -(-per_rank // max_micro_batch)
    while per_rank % accumulation:
        accumulation += 1
    return BatchPlan(global_batch, world_size, per_rank // accumulation, accumulation)


class GlobalBatchSampler:
    """Deterministic, disjoint per-rank shards of each global batch.

    Args:
        num_samples: size of the training set.
        plan: the batch split (see :func:`plan_batches`).
        rank: this rank's index.
        seed: the run's seed; epoch ``e`` uses the permutation drawn from ``seed`` and ``e``.

    Raises:
        DataError: when the global batch is larger than the training set (a user's data, found
            only once loaded where its size is the files').
    """

    def __init__(self, *, num_samples: int, plan: BatchPlan, rank: int, seed: int):
        if plan.global_batch > num_samples:
            raise DataError(
                f"data.batch_size={plan.global_batch} is larger than the training set "
                f"({num_samples} examples); generate more samples or lower the batch"
            )
        self.num_samples = num_samples
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = num_samples // plan.global_batch
        self._cached_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=g)
            self._cached_epoch = epoch
        assert self._perm is not None
        return self._perm

    def indices(self, step: int) -> list[torch.Tensor]:
        """This rank's micro-batches (index tensors) for global step ``step`` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.plan.global_batch + self.rank * self.plan.per_rank
        mine = self._permutation(epoch)[start : start + self.plan.per_rank]
        return list(mine.split(self.plan.micro_batch))


def eval_shards(num_samples: int, *, batch_size: int, rank: int, world_size: int):
    """Contiguous evaluation batches of this rank's share of an eval set (every example once)."""
    per_rank = -(-num_samples // world_size)
    start, stop = rank * per_rank, min(num_samples, (rank + 1) * per_rank)
    return list(torch.arange(start, stop).split(batch_size)) if stop > start else []
