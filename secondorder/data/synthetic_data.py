"""Deterministic synthetic classification data for tests, benchmarks and smoke runs."""

from __future__ import annotations

import math

import torch

from secondorder.data.core import DataBundle, DataSpec, TensorPairDataset

__all__ = ["synthetic", "synthetic_spec"]

# Number of scalar elements generated per step; bounds the temporary memory of generation.
_CHUNK_ELEMENTS = 1 << 22


def synthetic(
    *,
    num_samples: int = 1024,
    eval_samples: int = 256,
    shape: list[int] | None = None,
    num_classes: int = 10,
    seed: int = 0,
) -> DataBundle:
    """Builds a learnable random classification task.

    Inputs are i.i.d. standard normal. Labels come from a fixed random linear teacher: the
    argmax of ``flatten(x) @ W`` with ``W`` a random ``(prod(shape), num_classes)`` matrix
    whose columns have equal norm, so classes are roughly balanced and a linear model can reach
    100% accuracy. Everything is drawn from a ``torch.Generator`` seeded with ``seed`` (the
    global RNG is untouched), in chunks of about 4M elements so generating millions of elements
    needs no temporaries beyond the output tensors.

    Args:
        num_samples: Number of training samples.
        eval_samples: Number of evaluation samples (drawn after, and disjoint from, train).
        shape: Shape of one input; defaults to ``[3, 32, 32]``.
        num_classes: Number of classes (at least 2).
        seed: Seed of the generator.

    Returns:
        A bundle of two :class:`TensorPairDataset`.

    Raises:
        ValueError: If an argument is out of range.
    """
    shape = list(
        synthetic_spec(
            num_samples=num_samples,
            eval_samples=eval_samples,
            shape=shape,
            num_classes=num_classes,
        ).input_shape
    )
    dim = math.prod(shape)
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, num_classes, generator=generator)
    teacher /= teacher.norm(dim=0, keepdim=True)
    train = _draw(num_samples, dim, shape, teacher, generator)
    evaluation = _draw(eval_samples, dim, shape, teacher, generator)
    return DataBundle(
        train=train,
        eval=evaluation,
        num_classes=num_classes,
        input_shape=tuple(shape),
        description=(
            f"synthetic: {num_samples} train / {eval_samples} eval samples of shape "
            f"{tuple(shape)}, {num_classes} classes (linear teacher), seed={seed}"
        ),
    )


def synthetic_spec(
    *,
    num_samples: int,
    eval_samples: int,
    shape: list[int] | None,
    num_classes: int,
    **_: object,
) -> DataSpec:
    """What :func:`synthetic` makes of these arguments; checks them without drawing anything.

    Raises:
        ValueError: If an argument is out of range.
    """
    shape = [3, 32, 32] if shape is None else list(shape)
    if not shape or any(int(d) != d or d < 1 for d in shape):
        raise ValueError(f"shape must be a non-empty list of positive integers, got {shape}")
    if num_samples < 1 or eval_samples < 1:
        raise ValueError(
            f"num_samples and eval_samples must be positive, got {num_samples} and {eval_samples}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return DataSpec(
        input_shape=tuple(int(d) for d in shape),
        num_classes=num_classes,
        train_samples=num_samples,
        eval_samples=eval_samples,
    )


def _draw(
    count: int, dim: int, shape: list[int], teacher: torch.Tensor, generator: torch.Generator
) -> TensorPairDataset:
    x = torch.empty(count, dim)
    y = torch.empty(count, dtype=torch.int64)
    rows = max(1, _CHUNK_ELEMENTS // dim)
    for start in range(0, count, rows):
        stop = min(start + rows, count)
        torch.randn(stop - start, dim, generator=generator, out=x[start:stop])
        y[start:stop] = (x[start:stop] @ teacher).argmax(dim=1)
    return TensorPairDataset(x.view(count, *shape), y)
