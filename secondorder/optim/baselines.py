"""The torch.optim baselines with keyword-only, typed signatures: SGD and AdamW.

``torch.optim``'s constructors take positional arguments and options this project never sets
(``maximize``, ``foreach``, ...); these thin subclasses state the hyperparameters a run may set
and their defaults, like every other optimizer here, and change nothing in the update.
LARS and LAMB live in :mod:`.lars` and :mod:`.lamb`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from secondorder.optim.weight_decay import decay_groups

__all__ = ["SGD", "AdamW"]


class SGD(torch.optim.SGD):
    """Momentum SGD (``torch.optim.SGD``), which also refuses ``momentum >= 1`` (it diverges).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: heavy-ball momentum.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: coupled L2 weight decay.
        exclude_norm_and_bias_from_weight_decay: no decay for biases and norm-layer weights
            (see :mod:`secondorder.optim.weight_decay`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        exclude_norm_and_bias_from_weight_decay: bool = False,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        groups = decay_groups(params, exclude=exclude_norm_and_bias_from_weight_decay)
        super().__init__(
            groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )


class AdamW(torch.optim.AdamW):
    """AdamW (``torch.optim.AdamW``); ``eps`` is worth tuning (Choi et al. 2019).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: ``(β1, β2)``, the moment decays.
        eps: added to ``√v̂``.
        weight_decay: decoupled weight decay.
        exclude_norm_and_bias_from_weight_decay: no decay for biases and norm-layer weights.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        exclude_norm_and_bias_from_weight_decay: bool = False,
    ) -> None:
        groups = decay_groups(params, exclude=exclude_norm_and_bias_from_weight_decay)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
