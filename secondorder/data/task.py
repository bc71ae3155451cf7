"""What a run learns from a dataset's ``(inputs, labels)`` pairs: the one place that decides.

A classifier predicts the labels; an autoencoder reconstructs its inputs, so its targets are the
inputs themselves and it has no accuracy. Every consumer of a batch (training step, evaluation,
statistics workers, benchmarks) asks the task instead of deciding again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Task", "TaskKind"]

TaskKind = Literal["classification", "reconstruction"]


@dataclass(frozen=True)
class Task:
    """The learning problem of a run (plain data, so it pickles to worker processes).

    Attributes:
        kind: ``classification`` (targets are the labels) or ``reconstruction`` (targets are
            the inputs).
        loss: the loss kind, a key of :data:`secondorder.optim.LOSS_KINDS`; it also defines the
            curvature that second-order methods model.
    """

    kind: TaskKind = "classification"
    loss: str = "cross_entropy"

    @property
    def uses_labels(self) -> bool:
        """Whether targets come from the labels (and accuracy is defined)."""
        return self.kind == "classification"

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics a run of this task records (possible early-stop targets)."""
        return ("train_loss", "eval_loss", *(("eval_accuracy",) if self.uses_labels else ()))

    def targets(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The targets of a batch: the labels, or the inputs for reconstruction."""
        if not self.uses_labels:
            return inputs
        assert labels is not None, "a classification batch needs labels"
        return labels

    def to_device(
        self, inputs: torch.Tensor, labels: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` on ``device``; labels are copied only when they are targets."""
        inputs = inputs.to(device, non_blocking=True)
        if not self.uses_labels:
            return inputs, inputs
        assert labels is not None, "a classification batch needs labels"
        return inputs, labels.to(device, non_blocking=True)
