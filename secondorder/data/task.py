"""What a run learns from a dataset's ``(inputs, labels)`` pairs: the one place that decides.

A classifier predicts the labels; an autoencoder reconstructs its inputs, so its targets are the
inputs themselves and it has no accuracy. Every consumer of a batch (training step, evaluation,
statistics workers, benchmarks) asks the task instead of deciding again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["Normalization", "Task", "TaskKind", "device_inputs"]

TaskKind = Literal["classification", "reconstruction"]
# Per-channel (mean, std) in 0-1 units, as a data set's ``normalization`` attribute gives them.
Normalization = tuple[tuple[float, ...], tuple[float, ...]]


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
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor | None,
        device: torch.device,
        normalization: Normalization | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` on ``device`` (see :func:`device_inputs`); labels are copied
        only when they are targets."""
        inputs = device_inputs(inputs, device, normalization)
        if not self.uses_labels:
            return inputs, inputs
        assert labels is not None, "a classification batch needs labels"
        return inputs, labels.to(device, non_blocking=True)


_STATS: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # on their devices


def device_inputs(
    inputs: torch.Tensor, device: torch.device, normalization: Normalization | None = None
) -> torch.Tensor:
    """``inputs`` on ``device``. uint8 images (what loader workers hand over: a quarter of the
    bytes to copy and no float work on the CPU) become float32 there, divided by 255 and
    normalised with the data set's ``(mean, std)``; float inputs pass through unchanged. (Conv
    models on CUDA take their inputs in channels-last layout through their own forward pre-hook,
    :mod:`secondorder.trainer.gpu_step`, whoever calls them.)"""
    inputs = inputs.to(device, non_blocking=True)
    if inputs.dtype != torch.uint8:
        return inputs
    x = inputs.to(torch.float32).div_(255.0)
    if normalization is not None:
        mean, std = (tuple(float(v) for v in values) for values in normalization)
        key = (device, x.dim(), mean, std)
        if key not in _STATS:
            shape = (-1,) + (1,) * (x.dim() - 2)  # channels after the batch dimension
            _STATS[key] = (
                torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
                torch.tensor(std, dtype=torch.float32, device=device).view(shape),
            )
        mean_on_device, std_on_device = _STATS[key]
        x = x.sub_(mean_on_device).div_(std_on_device)
    return x
