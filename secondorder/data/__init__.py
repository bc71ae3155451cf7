"""Datasets and the registry that builds them by name.

Every factory in :data:`DATASETS` takes only keyword arguments, each with a default and a
simple annotation, and returns a :class:`DataBundle`. Datasets support ``len`` and
``__getitem__(i) -> (x, y)`` (float32 ``x``, int64 scalar ``y``); in-memory datasets also
provide a vectorised ``get_batch(indices)``.
"""

from __future__ import annotations

from collections.abc import Callable

from secondorder.data.cifar_data import CIFAR10Dataset, cifar10
from secondorder.data.core import DataBundle, DataError, TensorPairDataset
from secondorder.data.imagenet_data import ImageFolderDataset, imagenet
from secondorder.data.mnist1d_data import mnist1d
from secondorder.data.synthetic_data import synthetic
from secondorder.data.task import Task, TaskKind

__all__ = [
    "DATASETS",
    "CIFAR10Dataset",
    "DataBundle",
    "DataError",
    "ImageFolderDataset",
    "Task",
    "TaskKind",
    "TensorPairDataset",
    "build_data",
    "cifar10",
    "imagenet",
    "mnist1d",
    "synthetic",
]

DATASETS: dict[str, Callable[..., DataBundle]] = {
    "mnist1d": mnist1d,
    "synthetic": synthetic,
    "cifar10": cifar10,
    "imagenet": imagenet,
}


def build_data(name: str, **kwargs: object) -> DataBundle:
    """Builds the dataset registered under ``name``.

    Args:
        name: A key of :data:`DATASETS`.
        **kwargs: Keyword arguments of that factory.

    Returns:
        The factory's :class:`DataBundle`.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    try:
        factory = DATASETS[name]
    except KeyError:
        choices = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; choose one of: {choices}") from None
    return factory(**kwargs)
