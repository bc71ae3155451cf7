"""Registry factories for K-FAC: ``factory(params, context, *, <hyperparameters>)``.

The keyword-only arguments are the schema of ``configs/optimizer/kfac.yaml``,
``kfac_eigen.yaml`` and ``kfac_inverse.yaml``. Schedules are plain ints here (the class also
takes ``step -> int`` callables).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from secondorder.optim.context import OptimContext
from secondorder.optim.kfac.optimizer import KFAC

__all__ = ["kfac", "kfac_eigen", "kfac_inverse"]


def kfac(
    params: Iterable[torch.Tensor],
    context: OptimContext,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    damping: float = 1e-3,
    factor_decay: float = 0.95,
    factor_update_every: int = 10,
    inverse_update_every: int = 100,
    inverse_method: str = "eigen",
    fisher_type: str = "true",
    kl_clip: float | None = 1e-3,
    weight_decay: float = 0.0,
    levenberg_marquardt: bool = False,
    damping_adapt_every: int = 5,
    double_factor_threshold: int = 4096,
    exclude: list[str] | None = None,
    other_preconditioner: str = "none",
    grad_worker_fraction: float = 1.0,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """K-FAC (Martens & Grosse 2015) with KFC convolutions and distributed K-FAC (Ba et al.).

    ``context`` is an :class:`~secondorder.optim.OptimContext` (model, loss kind, comm).
    """
    return KFAC(
        params,
        model=context.model,
        loss_kind=context.loss_kind,
        comm=context.comm,
        lr=lr,
        momentum=momentum,
        damping=damping,
        factor_decay=factor_decay,
        factor_update_every=factor_update_every,
        inverse_update_every=inverse_update_every,
        inverse_method=inverse_method,
        fisher_type=fisher_type,
        kl_clip=kl_clip,
        weight_decay=weight_decay,
        levenberg_marquardt=levenberg_marquardt,
        damping_adapt_every=damping_adapt_every,
        double_factor_threshold=double_factor_threshold,
        exclude=list(exclude or []),
        other_preconditioner=other_preconditioner,
        grad_worker_fraction=grad_worker_fraction,
        seed=seed,
    )


def kfac_eigen(
    params: Iterable[torch.Tensor],
    context: OptimContext,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    damping: float = 1e-3,
    factor_decay: float = 0.95,
    factor_update_every: int = 10,
    inverse_update_every: int = 100,
    fisher_type: str = "true",
    kl_clip: float | None = 1e-3,
    weight_decay: float = 0.0,
    levenberg_marquardt: bool = False,
    damping_adapt_every: int = 5,
    double_factor_threshold: int = 4096,
    exclude: list[str] | None = None,
    other_preconditioner: str = "none",
    grad_worker_fraction: float = 1.0,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """K-FAC preconditioning in the Kronecker eigenbasis (``λ`` added to ``d_G d_Aᵀ``)."""
    hyper = {k: v for k, v in locals().items() if k not in ("params", "context")}
    return kfac(params, context, inverse_method="eigen", **hyper)


def kfac_inverse(
    params: Iterable[torch.Tensor],
    context: OptimContext,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    damping: float = 1e-3,
    factor_decay: float = 0.95,
    factor_update_every: int = 10,
    inverse_update_every: int = 100,
    fisher_type: str = "true",
    kl_clip: float | None = 1e-3,
    weight_decay: float = 0.0,
    levenberg_marquardt: bool = False,
    damping_adapt_every: int = 5,
    double_factor_threshold: int = 4096,
    exclude: list[str] | None = None,
    other_preconditioner: str = "none",
    grad_worker_fraction: float = 1.0,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """K-FAC with explicit damped inverses and the π-corrected factored Tikhonov damping."""
    hyper = {k: v for k, v in locals().items() if k not in ("params", "context")}
    return kfac(params, context, inverse_method="inverse", **hyper)
