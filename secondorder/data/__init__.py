"""Datasets and the registry that builds them by name.

Every factory in :data:`DATASETS` takes only keyword arguments, each with a default and a
simple annotation, and returns a :class:`DataBundle`. Datasets support ``len`` and
``__getitem__(i) -> (x, y)`` (float32 ``x``, int64 scalar ``y``); in-memory datasets also
provide a vectorised ``get_batch(indices)``. Each factory has a companion in
:data:`DATA_SPECS` that tells, from the same arguments and without loading anything, what the
factory will produce (:class:`DataSpec`), so a config is checked against the model first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from secondorder.data.cifar_data import CIFAR10Dataset, cifar10, cifar10_spec
from secondorder.data.core import DataBundle, DataError, DataSpec, TensorPairDataset
from secondorder.data.imagenet_data import ImageFolderDataset, imagenet, imagenet_spec
from secondorder.data.mnist1d_data import mnist1d, mnist1d_spec
from secondorder.data.synthetic_data import synthetic, synthetic_spec
from secondorder.data.task import Task, TaskKind
from secondorder.data.teacher_student_data import teacher_student, teacher_student_spec

__all__ = [
    "DATASETS",
    "DATA_SPECS",
    "CIFAR10Dataset",
    "DataBundle",
    "DataError",
    "DataSpec",
    "ImageFolderDataset",
    "Task",
    "TaskKind",
    "TensorPairDataset",
    "build_data",
    "cifar10",
    "data_spec",
    "imagenet",
    "mnist1d",
    "synthetic",
    "teacher_student",
]

DATASETS: dict[str, Callable[..., DataBundle]] = {
    "mnist1d": mnist1d,
    "synthetic": synthetic,
    "cifar10": cifar10,
    "imagenet": imagenet,
    "teacher_student": teacher_student,
}

#: For each factory, what it produces given the same (complete) keyword arguments.
DATA_SPECS: dict[str, Callable[..., DataSpec]] = {
    "mnist1d": mnist1d_spec,
    "synthetic": synthetic_spec,
    "cifar10": cifar10_spec,
    "imagenet": imagenet_spec,
    "teacher_student": teacher_student_spec,
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
    return _factory(name)(**kwargs)


def data_spec(name: str, **kwargs: object) -> DataSpec:
    """What :func:`build_data` would produce for these arguments, without loading any data.

    Args:
        name: A key of :data:`DATASETS`.
        **kwargs: Keyword arguments of that factory; missing ones take the factory's defaults.

    Raises:
        ValueError: If ``name`` is not registered or an argument is out of range.
    """
    arguments = inspect.signature(_factory(name)).bind(**kwargs)
    arguments.apply_defaults()
    return DATA_SPECS[name](**arguments.arguments)


def _factory(name: str) -> Callable[..., DataBundle]:
    try:
        return DATASETS[name]
    except KeyError:
        choices = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; choose one of: {choices}") from None
