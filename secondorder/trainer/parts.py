"""The objects a :class:`~secondorder.trainer.Trainer` runs, grouped by what they are for.

:mod:`secondorder.build` makes them from a config; a plain script can make them by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from secondorder.data.loader import EvalLoader, StepLoader, make_eval_loader, make_step_loader
from secondorder.data.sampler import BatchPlan, GlobalBatchSampler, eval_shards
from secondorder.data.task import Task
from secondorder.trainer.records import NullLogger

__all__ = ["DataFeed", "RunOutput", "RunParts"]


@dataclass(frozen=True)
class RunParts:
    """What a step computes with.

    Attributes:
        model: the network, already on ``device`` and identical on every rank.
        optimizer: any optimizer following the closure contract.
        comm: the communicator (world size 1 without a launcher).
        device: where batches go.
        verify_every: compare a parameter checksum across ranks every this many steps and fail
            loudly when they differ (0 = never).
        overlap: overlap the gradient all-reduce with backward (see ``BatchClosure``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    comm: Any
    device: torch.device
    verify_every: int = 0
    overlap: bool = True


@dataclass(frozen=True)
class DataFeed:
    """What each rank reads at each step, what it evaluates on, and what the targets are.

    Attributes:
        train: training split (``get_batch`` for in-memory datasets).
        eval: held-out split, evaluated whole.
        task: turns ``(inputs, labels)`` into ``(inputs, targets)`` and names the loss.
        sampler: this rank's share of every global batch; it holds the batch plan and the
            number of steps per epoch.
        eval_batch_size: evaluation batch per rank.
        num_workers: data-loading processes for datasets decoded per item (0: in this process).
        loader: the training batches (a :class:`~secondorder.data.loader.StepLoader`); made
            from the fields above when not given (see :meth:`loaders`).
        eval_loader: the evaluation batches; made from the fields above when not given.
    """

    train: Dataset
    eval: Dataset
    task: Task
    sampler: GlobalBatchSampler
    eval_batch_size: int = 1024
    num_workers: int = 0
    loader: StepLoader | None = None
    eval_loader: EvalLoader | None = None

    @property
    def plan(self) -> BatchPlan:
        return self.sampler.plan

    def loaders(
        self, device: torch.device, *, rank: int, world_size: int, total_steps: int | None = None
    ) -> tuple[StepLoader, EvalLoader]:
        """The given loaders, or ones over the splits with ``num_workers`` (built once per run:
        worker processes start at the first batch and stay until ``close``)."""
        loader = self.loader or make_step_loader(
            self.train,
            self.sampler,
            num_workers=self.num_workers,
            device=device,
            total_steps=total_steps,
        )
        shards = eval_shards(
            len(self.eval), batch_size=self.eval_batch_size, rank=rank, world_size=world_size
        )
        eval_loader = self.eval_loader or make_eval_loader(
            self.eval, shards, num_workers=self.num_workers, device=device
        )
        return loader, eval_loader


@dataclass(frozen=True)
class RunOutput:
    """Where a run reports (rank 0 writes).

    Attributes:
        run_dir: output directory: metrics, summary, checkpoints, final weights.
        names: ``model``, ``optimizer``, ``data`` names for the summary and checkpoint checks.
        logger: wandb or a null logger.
        options: the ``model`` and ``data`` groups' options; checkpoints record them so a
            resume with another architecture or data set is refused by the key that differs.
    """

    run_dir: Path
    names: dict[str, str]
    logger: Any = field(default_factory=NullLogger)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
