"""Evaluation over the held-out split, sharded over ranks and reduced exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from secondorder.data.loader import EvalLoader
from secondorder.data.task import Normalization, Task
from secondorder.optim.losses import loss_value


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: EvalLoader,
    *,
    task: Task,
    comm: Any,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    normalization: Normalization | None = None,
) -> dict[str, float]:
    """Mean loss (and accuracy where the task has labels) over every held-out example once;
    ``normalization`` is the held-out set's, for uint8 inputs."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for inputs, labels in loader.batches():
        inputs, targets = task.to_device(inputs, labels, device, normalization)
        with autocast():
            outputs = model(inputs)
        if outputs.dtype in (torch.float16, torch.bfloat16):
            outputs = outputs.float()
        totals[0] += loss_value(task.loss, outputs, targets, reduction="sum").double()
        if task.uses_labels:
            totals[1] += (outputs.argmax(1) == targets).sum()
        totals[2] += inputs.shape[0]
    comm.all_reduce(totals, op="sum")
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    result = {"eval_loss": loss_sum / max(count, 1.0)}
    if task.uses_labels:
        result["eval_accuracy"] = correct / max(count, 1.0)
    return result
