"""Optimizers: the first-order baselines and the second-order methods, one file per algorithm.

Every optimizer is a ``torch.optim.Optimizer`` stepped as ``loss = optimizer.step(closure)``
(see :mod:`secondorder.optim.closure`). :data:`OPTIMIZERS` maps a config name to a factory
``factory(params, context, *, <hyperparameters>)``; the factory's keyword-only, typed
hyperparameters are the schema of the matching ``configs/optimizer/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from secondorder.optim import baselines, curveball, neumann, newton, newton_cg
from secondorder.optim.closure import BatchClosure, LossScaler, NonFiniteGradients
from secondorder.optim.context import OptimContext
from secondorder.optim.curveball import CurveBall
from secondorder.optim.kfac import KFAC
from secondorder.optim.kfac import factories as kfac_factories
from secondorder.optim.lamb import LAMB
from secondorder.optim.lars import LARS
from secondorder.optim.losses import LOSS_KINDS, LossKind, loss_value
from secondorder.optim.neumann import Neumann
from secondorder.optim.newton import ExactNewton
from secondorder.optim.newton_cg import GaussNewtonCG, NewtonCG

__all__ = [
    "LAMB",
    "LARS",
    "LOSS_KINDS",
    "OPTIMIZERS",
    "BatchClosure",
    "CurveBall",
    "ExactNewton",
    "GaussNewtonCG",
    "KFAC",
    "LossKind",
    "LossScaler",
    "Neumann",
    "NewtonCG",
    "NonFiniteGradients",
    "OptimContext",
    "build_optimizer",
    "loss_value",
]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    # Submodules share their names with the factories, so the registry names the factories
    # through their modules and never rebinds a submodule name in this package.
    "sgd": baselines.sgd,
    "adamw": baselines.adamw,
    "lars": baselines.lars,
    "lamb": baselines.lamb,
    "neumann": neumann.neumann,
    "curveball": curveball.curveball,
    "kfac": kfac_factories.kfac,
    "kfac_eigen": kfac_factories.kfac_eigen,
    "kfac_inverse": kfac_factories.kfac_inverse,
    "newton": newton.newton,
    "newton_cg": newton_cg.newton_cg,
    "ggn_cg": newton_cg.ggn_cg,
}


def build_optimizer(
    name: str, params: Iterable[torch.Tensor], context: OptimContext, **hyper: Any
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` with hyperparameters ``hyper``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, context, **hyper)
