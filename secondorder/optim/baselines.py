"""Factories of the first-order baselines: SGD, AdamW, LARS, LAMB (registry signature)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from secondorder.optim.context import OptimContext
from secondorder.optim.lamb import LAMB
from secondorder.optim.lars import LARS


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
