"""LARS: layer-wise adaptive rate scaling.

Implements Algorithm 1 of You, Gitman & Ginsburg (2017), "Large Batch Training of Convolutional
Networks" (arXiv:1708.03888), as a :class:`torch.optim.Optimizer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from secondorder.optim.layerwise import LayerwiseOptimizer, check_shared_options
from secondorder.optim.weight_decay import decay_groups

__all__ = ["LARS"]


class LARS(LayerwiseOptimizer):
    """Momentum SGD with layer-wise adaptive rate scaling (LARS).

    Implements Algorithm 1 of You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional
    Networks". For every parameter tensor ``w`` (one "layer" ``l``) with gradient ``g``, one step
    with global learning rate ``lr`` (``γ_t`` in the paper), momentum ``m``, weight decay ``β`` and
    trust coefficient ``η`` is::

        local_lr = η * ||w|| / (||g|| + β * ||w|| + eps)      # Algorithm 1, local LR  λ^l
        v        = m * v + lr * local_lr * (g + β * w)          # Algorithm 1, momentum update
        w        = w - v                                        # Algorithm 1, weight update

    where the momentum buffer ``v`` starts at zero. ``eps`` only guards the division; it is not
    part of the paper's formula. If ``||w|| == 0`` or ``||g|| == 0`` the trust ratio ``local_lr``
    is set to 1 (so the step is plain momentum SGD with rate ``lr``), which avoids freezing
    zero-initialised layers and avoids ``0/0``. The choice is made on-device with
    :func:`torch.where`, so ``step`` never synchronises with the host.

    With ``nesterov=True`` the applied update is ``m * v + lr * local_lr * (g + β * w)`` (with
    the already-updated ``v``), i.e. the Nesterov variant used by :class:`torch.optim.SGD`; this
    is an extension, not part of Algorithm 1.

    Excluding 1-D parameters:
        With ``exclude_1d=True`` (the default) every parameter with ``ndim <= 1`` -- biases and the
        affine parameters of normalisation layers -- gets neither layer-wise adaptation nor weight
        decay: its update is plain momentum SGD, ``v = m * v + lr * g``. This follows common
        large-batch practice (e.g. the LARS setups used for ResNet-50/ImageNet and SimCLR), not
        the paper, which adapts every layer.

    Per-group options:
        Each parameter group may override ``lr``, ``momentum``, ``weight_decay``,
        ``trust_coefficient``, ``eps``, ``nesterov`` and ``exclude_1d``; e.g.
        ``[{"params": convs}, {"params": head, "weight_decay": 0.0, "exclude_1d": False}]``.
        Overrides are validated like the constructor arguments.

    State (per parameter, saved by :meth:`state_dict`): ``momentum_buffer`` (absent when
    ``momentum == 0``).

    Args:
        params: Iterable of parameters or of parameter-group dicts.
        lr: Global learning rate ``γ`` (must be ``>= 0``).
        momentum: Momentum ``m`` in ``[0, 1)``.
        weight_decay: L2 weight decay ``β`` (``>= 0``).
        trust_coefficient: Trust coefficient ``η`` (``> 0``); the paper uses ``0.001``.
        eps: Non-negative constant added to the denominator of the trust ratio.
        nesterov: Use Nesterov momentum (requires ``momentum > 0``).
        exclude_1d: Treat parameters with ``ndim <= 1`` as plain momentum SGD (no adaptation, no
            weight decay).
        exclude_norm_and_bias_from_weight_decay: no weight decay for biases and norm-layer
            weights, whatever ``exclude_1d`` says about their adaptation.

    Raises:
        ValueError: If any hyper-parameter is out of range; the message names the bad value.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-9,
        nesterov: bool = False,
        exclude_1d: bool = True,
        exclude_norm_and_bias_from_weight_decay: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "nesterov": nesterov,
            "exclude_1d": exclude_1d,
        }
        _validate(defaults)
        super().__init__(
            decay_groups(params, exclude=exclude_norm_and_bias_from_weight_decay), defaults
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        _validate(group)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        """Algorithm 1 on one layer: one iteration of the ``while`` loop for ``w = p``."""
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if group["exclude_1d"] and p.ndim <= 1:
            # Excluded (bias / norm) parameter: plain momentum SGD, no weight decay.
            update = grad.mul(lr)
        else:
            # Algorithm 1: local LR  λ = η ||w|| / (||∇L|| + β ||w||).
            w_norm = torch.linalg.vector_norm(p)
            g_norm = torch.linalg.vector_norm(grad)
            local_lr = (
                group["trust_coefficient"]
                * w_norm
                / (g_norm + weight_decay * w_norm + group["eps"])
            )
            # Trust ratio 1 when either norm is zero (on-device, no host sync).
            local_lr = torch.where((w_norm > 0) & (g_norm > 0), local_lr, torch.ones_like(local_lr))
            # Algorithm 1: γ λ (∇L(w) + β w).
            update = grad.add(p, alpha=weight_decay) if weight_decay != 0 else grad
            update = update.mul(local_lr * lr)

        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["momentum_buffer"] = buf
            # Algorithm 1: v = m v + γ λ (∇L(w) + β w).
            buf.mul_(momentum).add_(update)
            if group["nesterov"]:
                update.add_(buf, alpha=momentum)
            else:
                update = buf
        # Algorithm 1: w = w - v.
        p.sub_(update)


def _validate(group: dict[str, Any]) -> None:
    """Check LARS hyper-parameters of a parameter group (or of the defaults).

    Raises:
        ValueError: If a value is out of range; the message names the value.
    """
    check_shared_options(group, flags=("nesterov", "exclude_1d"))
    momentum = group["momentum"]
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 < group["trust_coefficient"]:
        raise ValueError(f"Invalid trust_coefficient value: {group['trust_coefficient']}")
    if group["nesterov"] and momentum == 0:
        raise ValueError(f"Nesterov momentum requires momentum > 0, got momentum={momentum}")
