"""Step loaders: this rank's micro-batches of a global step, prepared ahead of the step.

A loader is built once per run. In-memory data sets (``get_batch``) gather each micro-batch in
one vectorised call. Data sets decoded per item (image folders) go to persistent worker
processes: a torch ``DataLoader`` with ``persistent_workers`` over a batch sampler that yields
*chunks*, so every worker prepares part of every step (a whole step given to one worker decodes
on one core). A background thread takes the chunks in order, joins them into the step's
micro-batches (in pinned memory on CUDA) and keeps the next step ready while the current one
computes; the ``DataLoader``'s own prefetch keeps the workers busy on the steps after it.

What a rank sees does not depend on the number of workers: the order is the sampler's, and each
sample's augmentation is seeded by (run seed, step, position of the sample in the global batch):
a data set's ``sample(index, generator)`` gets a generator seeded so, one without it is read
with torch's global RNG seeded so (see :func:`~secondorder.data.pipeline.load_items`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from secondorder.data.pipeline import (
    Batch,
    Group,
    LoaderError,
    WorkerPipeline,
    load_items,
    sample_seed,
)
from secondorder.data.sampler import GlobalBatchSampler

__all__ = [
    "auto_workers",
    "EvalLoader",
    "LoaderError",
    "StepLoader",
    "load_items",
    "make_eval_loader",
    "make_step_loader",
    "sample_seed",
]

_END = 2**62  # no last step: the trainer stops asking


class StepLoader(Protocol):
    def batches(self, step: int) -> list[Batch]:
        """This rank's (inputs, labels) micro-batches of global step ``step`` (0-based), in the
        sampler's order. Called with step, step+1, ... (a resumed run starts at any step);
        may prepare later steps in the background."""

    def close(self) -> None:
        """Stop background work and processes; idempotent."""


# -- loaders without worker processes ---------------------------------------------------------


class InMemoryLoader:
    """Data sets with ``get_batch``: one vectorised gather per micro-batch, nothing ahead."""

    def __init__(self, dataset: Any, sampler: GlobalBatchSampler):
        self.dataset, self.sampler = dataset, sampler

    def batches(self, step: int) -> list[Batch]:
        return [self.dataset.get_batch(idx) for idx in self.sampler.indices(step)]

    def close(self) -> None:
        return None


class InProcessLoader:
    """``num_workers=0``: items prepared in this process when asked, nothing ahead."""

    def __init__(self, dataset: Dataset, sampler: GlobalBatchSampler):
        self.dataset, self.sampler = dataset, sampler

    def batches(self, step: int) -> list[Batch]:
        start, out = self.sampler.rank * self.sampler.plan.per_rank, []
        for idx in self.sampler.indices(step):
            out.append(
                load_items(
                    self.dataset, idx.tolist(), seed=self.sampler.seed, step=step, start=start
                )
            )
            start += len(idx)
        return out

    def close(self) -> None:
        return None


class WorkerStepLoader:
    """:class:`StepLoader` over persistent worker processes (see :class:`WorkerPipeline`)."""

    def __init__(
        self,
        dataset: Dataset,
        sampler: GlobalBatchSampler,
        *,
        num_workers: int,
        prefetch_steps: int = 2,
        pin_device: torch.device | None = None,
        total_steps: int | None = None,
    ):
        self.sampler = copy.copy(sampler)  # its permutation cache is used by the thread
        self.total_steps = _END if total_steps is None else total_steps
        self.pipeline = WorkerPipeline(
            dataset,
            self._group,
            seed=sampler.seed,
            num_workers=num_workers,
            prefetch_groups=prefetch_steps,
            pin_device=pin_device,
        )

    def _group(self, step: int) -> Group:
        start = self.sampler.rank * self.sampler.plan.per_rank
        return Group(self.sampler.indices(step), step, start)

    def batches(self, step: int) -> list[Batch]:
        if step != self.pipeline.next:  # the first step, a resume, or a jump
            self.pipeline.start(step, max(self.total_steps, step + 1))
        return self.pipeline.get()

    def close(self) -> None:
        self.pipeline.close()


# -- evaluation -------------------------------------------------------------------------------


class EvalLoader:
    """This rank's evaluation batches (every held-out example once over the ranks), through
    persistent workers built at the first evaluation and kept for the next ones."""

    def __init__(
        self,
        dataset: Any,
        shards: list[torch.Tensor],
        *,
        num_workers: int,
        pin_device: torch.device | None = None,
    ):
        self.dataset, self.shards = dataset, shards
        self.num_workers, self.pin_device = num_workers, pin_device
        self.pipeline: WorkerPipeline | None = None

    def batches(self) -> Iterator[Batch]:
        if hasattr(self.dataset, "get_batch"):
            for idx in self.shards:
                yield self.dataset.get_batch(idx)
            return
        if self.num_workers == 0 or not self.shards:
            for idx in self.shards:
                yield load_items(self.dataset, idx.tolist(), seed=0, step=None, start=0)
            return
        if self.pipeline is None:
            self.pipeline = WorkerPipeline(
                self.dataset,
                lambda number: Group([self.shards[number]], None, 0),
                seed=0,
                num_workers=self.num_workers,
                pin_device=self.pin_device,
            )
        self.pipeline.start(0, len(self.shards))
        for _ in self.shards:
            yield from self.pipeline.get()

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()


def make_step_loader(
    dataset: Any,
    sampler: GlobalBatchSampler,
    *,
    num_workers: int,
    device: torch.device | None = None,
    prefetch_steps: int = 2,
    total_steps: int | None = None,
) -> StepLoader:
    """The loader for ``dataset``: vectorised for in-memory data, in this process for
    ``num_workers=0``, else persistent workers (pinned batches for a CUDA ``device``)."""
    if hasattr(dataset, "get_batch"):
        return InMemoryLoader(dataset, sampler)
    if num_workers == 0:
        return InProcessLoader(dataset, sampler)
    return WorkerStepLoader(
        dataset,
        sampler,
        num_workers=num_workers,
        prefetch_steps=prefetch_steps,
        pin_device=device if device is not None and device.type == "cuda" else None,
        total_steps=total_steps,
    )


def make_eval_loader(
    dataset: Any,
    shards: list[torch.Tensor],
    *,
    num_workers: int,
    device: torch.device | None = None,
) -> EvalLoader:
    """The evaluation loader over this rank's ``shards`` (see :func:`sampler.eval_shards`)."""
    pin = device if device is not None and device.type == "cuda" else None
    return EvalLoader(dataset, shards, num_workers=num_workers, pin_device=pin)


AUTO_MAX_WORKERS = 16  # enough to feed one GPU with ResNet-50; more processes only add memory


def auto_workers(environ: Mapping[str, str]) -> int:
    """``data.num_workers=auto``: the CPU cores this process may use, shared by the ranks on this
    node (``LOCAL_WORLD_SIZE`` of torchrun, Horovod's or Open MPI's local size), minus one for
    the rank itself, at most :data:`AUTO_MAX_WORKERS`."""
    local = next(
        (
            int(environ[name])
            for name in ("LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
            if name in environ
        ),
        1,
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(AUTO_MAX_WORKERS, (cores or 1) // max(local, 1) - 1))
