"""Core data types shared by every dataset factory.

This module defines the error type raised for user-facing data problems, what a factory will
produce (known from its arguments alone), the bundle that every factory returns and a small
in-memory dataset backed by two tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

__all__ = ["DataBundle", "DataError", "DataSpec", "TensorPairDataset"]


class DataError(ValueError):
    """A problem with the data on disk or its layout that the user has to fix.

    The message always names the offending file or directory.
    """


@dataclass(frozen=True)
class DataSpec:
    """What a data set will produce, known from the factory's arguments alone.

    Config validation checks the model against it before anything is generated, read or
    loaded, so a mismatch costs one message instead of a shape error after the data is ready.

    Attributes:
        input_shape: Shape of one input ``x`` (without the batch dimension).
        num_classes: Number of label classes; ``None`` where the files decide.
        train_samples: Size of the training split; ``None`` where the files decide.
        eval_samples: Size of the evaluation split; ``None`` where the files decide.
    """

    input_shape: tuple[int, ...]
    num_classes: int | None
    train_samples: int | None = None
    eval_samples: int | None = None


@dataclass
class DataBundle:
    """Everything a trainer needs to know about a dataset.

    Attributes:
        train: Training split. Supports ``len`` and ``__getitem__(i) -> (x, y)``; in-memory
            datasets also provide a vectorised ``get_batch(indices)``.
        eval: Evaluation split with the same interface and no random augmentation.
        num_classes: Number of classes for classification data, ``None`` otherwise.
        input_shape: Shape of one input ``x`` (without the batch dimension).
        description: One-line human readable summary, suitable for logging.
    """

    train: Dataset
    eval: Dataset
    num_classes: int | None
    input_shape: tuple[int, ...]
    description: str


class TensorPairDataset(Dataset):
    """In-memory dataset of ``(x, y)`` pairs stored as two tensors.

    Args:
        x: Inputs with the sample dimension first; stored as float32.
        y: Integer labels of shape ``(N,)``; stored as int64.

    Raises:
        ValueError: If the leading dimensions differ or ``y`` is not one-dimensional.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if y.dim() != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {tuple(y.shape)}")
        if x.dim() < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"inputs and labels disagree on the number of samples: "
                f"x has shape {tuple(x.shape)}, y has shape {tuple(y.shape)}"
            )
        if y.is_floating_point() or y.is_complex():
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        self.x = x.to(torch.float32).contiguous()
        self.y = y.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the samples at ``indices`` as one batch.

        Args:
            indices: One-dimensional integer tensor of sample indices.

        Returns:
            ``(x, y)`` with ``x`` of shape ``(len(indices), *input_shape)`` and ``y`` of shape
            ``(len(indices),)``; identical to stacking ``self[i]`` for each index.
        """
        indices = torch.as_tensor(indices, dtype=torch.long)
        return self.x[indices], self.y[indices]
