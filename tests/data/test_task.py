"""The task decides what the targets of a batch are and which metrics a run records."""

from __future__ import annotations

import pickle

import torch

from secondorder.data import Task


def test_classification_targets_are_the_labels() -> None:
    task = Task(kind="classification", loss="cross_entropy")
    x, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    assert task.targets(x, y) is y
    inputs, targets = task.to_device(x, y, torch.device("cpu"))
    assert torch.equal(inputs, x) and torch.equal(targets, y)
    assert task.uses_labels
    assert task.metrics == ("train_loss", "eval_loss", "eval_accuracy")


def test_reconstruction_targets_are_the_inputs_and_labels_are_not_needed() -> None:
    task = Task(kind="reconstruction", loss="mse")
    x = torch.randn(4, 3)
    assert task.targets(x, torch.zeros(4, dtype=torch.long)) is x
    inputs, targets = task.to_device(x, None, torch.device("cpu"))
    assert targets is inputs and torch.equal(inputs, x)
    assert not task.uses_labels
    assert task.metrics == ("train_loss", "eval_loss")


def test_task_pickles_for_worker_processes() -> None:
    task = Task(kind="reconstruction", loss="bernoulli")
    assert pickle.loads(pickle.dumps(task)) == task
