"""What an optimizer may need besides its parameters and hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from secondorder.optim.losses import LossKind


@dataclass(frozen=True)
class OptimContext:
    """The run's objects a curvature method may need; ``build_optimizer`` passes each field to
    a class only when its signature takes an argument of that name.

    Attributes:
        model: the network (hooks, functional calls).
        loss_kind: defines the Gauss-Newton matrix and the sampled Fisher.
        comm: the communicator (``None``: one process).
        steps_per_epoch: for schedules stated in epochs.
    """

    model: nn.Module
    loss_kind: LossKind
    comm: Any = None
    steps_per_epoch: int = 1
