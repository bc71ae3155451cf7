"""Optimizers: the first-order baselines and the second-order methods, one file per algorithm.

Every optimizer is a ``torch.optim.Optimizer`` stepped as ``loss = optimizer.step(closure)``
(see :mod:`secondorder.optim.closure`). Each class's keyword-only, typed signature is its schema:
:data:`OPTIMIZERS` (:mod:`.registry`) maps a config name to the class, and the config keys of
``configs/optimizer/<name>.yaml`` are read from that signature.
"""

from __future__ import annotations

from secondorder.optim.baselines import SGD, AdamW
from secondorder.optim.closure import BatchClosure, LossScaler, NonFiniteGradients
from secondorder.optim.context import OptimContext
from secondorder.optim.curveball import CurveBall
from secondorder.optim.kfac import KFAC
from secondorder.optim.lamb import LAMB
from secondorder.optim.lars import LARS
from secondorder.optim.library_optimizers import SOAP, Muon, Shampoo
from secondorder.optim.losses import LOSS_KINDS, LossKind, loss_value
from secondorder.optim.neumann import Neumann
from secondorder.optim.newton import ExactNewton
from secondorder.optim.newton_cg import GaussNewtonCG, NewtonCG
from secondorder.optim.registry import OPTIMIZERS, build_optimizer, hyperparameters

__all__ = [
    "LAMB",
    "LARS",
    "LOSS_KINDS",
    "OPTIMIZERS",
    "SGD",
    "SOAP",
    "AdamW",
    "BatchClosure",
    "CurveBall",
    "ExactNewton",
    "GaussNewtonCG",
    "KFAC",
    "LossKind",
    "LossScaler",
    "Muon",
    "Neumann",
    "NewtonCG",
    "NonFiniteGradients",
    "OptimContext",
    "Shampoo",
    "build_optimizer",
    "hyperparameters",
    "loss_value",
]
