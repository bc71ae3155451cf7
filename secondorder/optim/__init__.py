"""Optimizers: the first-order baselines and the second-order methods, one file per algorithm.

Every optimizer is a ``torch.optim.Optimizer`` stepped as ``loss = optimizer.step(closure)``
(see :mod:`secondorder.optim.closure`). :data:`OPTIMIZERS` maps a config name to a factory
``factory(params, context, *, <hyperparameters>)``; the factory's keyword-only, typed
hyperparameters are the schema of the matching ``configs/optimizer/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secondorder.optim.closure import BatchClosure, LossScaler, NonFiniteGradients
from secondorder.optim.lamb import LAMB
from secondorder.optim.lars import LARS
from secondorder.optim.losses import LOSS_KINDS, LossKind, loss_value

__all__ = [
    "LAMB",
    "LARS",
    "LOSS_KINDS",
    "OPTIMIZERS",
    "BatchClosure",
    "LossKind",
    "LossScaler",
    "NonFiniteGradients",
    "OptimContext",
    "build_optimizer",
    "loss_value",
]


@dataclass(frozen=True)
class OptimContext:
    """What a curvature method may need beyond its parameters.

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


def sgd(
    params: Iterable[torch.Tensor],
    context: OptimContext,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Momentum SGD (``torch.optim.SGD``)."""
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )


def adamw(
    params: Iterable[torch.Tensor],
    context: OptimContext,
    *,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> torch.optim.Optimizer:
    """AdamW (``torch.optim.AdamW``); ``eps`` is a tuned hyperparameter (Choi et al. 2019)."""
    return torch.optim.AdamW(
        params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
    )


def lars(
    params: Iterable[torch.Tensor],
    context: OptimContext,
    *,
    lr: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    nesterov: bool = False,
    exclude_1d: bool = True,
) -> torch.optim.Optimizer:
    """LARS (You, Gitman & Ginsburg 2017)."""
    return LARS(
        params,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        nesterov=nesterov,
        exclude_1d=exclude_1d,
    )


def lamb(
    params: Iterable[torch.Tensor],
    context: OptimContext,
    *,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    max_trust_ratio: float | None = 10.0,
    exclude_1d: bool = True,
) -> torch.optim.Optimizer:
    """LAMB (You et al. 2020)."""
    return LAMB(
        params,
        lr=lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        max_trust_ratio=max_trust_ratio,
        exclude_1d=exclude_1d,
    )


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": sgd,
    "adamw": adamw,
    "lars": lars,
    "lamb": lamb,
}


def build_optimizer(
    name: str, params: Iterable[torch.Tensor], context: OptimContext, **hyper: Any
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` with hyperparameters ``hyper``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, context, **hyper)
