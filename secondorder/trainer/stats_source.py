"""What a statistics worker needs to rebuild the training problem in its own process.

K-FAC's statistics workers (asynchronous curvature workers; Ba, Grosse & Martens 2017,
section 5) hold a replica of the model and draw their own mini-batches from the training set.
A spawned process cannot receive the trainer's live objects, so it receives this recipe (plain
data, picklable) and builds them itself: the same registry names and keyword arguments as the
run's config, hence the same architecture and the same (cached, deterministic) dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from secondorder.data import build_data
from secondorder.data.task import Task, device_inputs
from secondorder.models import build_model

__all__ = ["StatsSource"]

BatchFn = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class StatsSource:
    """Registry names and keyword arguments of the run's model and data.

    Attributes:
        model: a key of :data:`secondorder.models.MODELS`.
        data: a key of :data:`secondorder.data.DATASETS`.
        model_kwargs: the model factory's keyword arguments.
        data_kwargs: the data factory's keyword arguments.
        task: what the targets are, as in the trainer.
    """

    model: str
    data: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    task: Task = field(default_factory=Task)

    def build(self) -> tuple[nn.Module, BatchFn, int]:
        """The model (freshly initialised: the caller loads parameters), a function from
        training-set indices to ``(inputs, targets)``, and the training-set size."""
        train = build_data(self.data, **self.data_kwargs).train
        model = build_model(self.model, **self.model_kwargs)
        task = self.task

        def batch(indices: Tensor) -> tuple[Tensor, Tensor]:
            if hasattr(train, "get_batch"):
                x, y = train.get_batch(indices)
            else:
                pairs = [train[int(i)] for i in indices]
                x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
                y = torch.as_tensor([int(p[1]) for p in pairs])
            # uint8 images as the trainer gets them: float, normalised (see Task.to_device)
            x = device_inputs(x, x.device, getattr(train, "normalization", None))
            return x, task.targets(x, y)

        return model, batch, len(train)
