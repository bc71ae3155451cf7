"""LAMB: layer-wise adaptive moments for batch training.

Implements Algorithm 2 of You et al. (2020), "Large Batch Optimization for Deep Learning: Training
BERT in 76 minutes" (ICLR 2020, arXiv:1904.00962), as a :class:`torch.optim.Optimizer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from secondorder.optim.layerwise import LayerwiseOptimizer, check_shared_options
from secondorder.optim.weight_decay import decay_groups

__all__ = ["LAMB"]


class LAMB(LayerwiseOptimizer):
    """Adam moments with a layer-wise trust ratio (LAMB).

    Implements Algorithm 2 of You et al. 2020, "Large Batch Optimization for Deep Learning:
    Training BERT in 76 minutes". For every parameter tensor ``w`` (one "layer") with gradient
    ``g``, step ``t`` (starting at 1) with learning rate ``η``, betas ``(β1, β2)``, ``eps`` ``ε``
    and weight decay ``λ`` is::

        m = β1 m + (1 - β1) g                                   # Algorithm 2, first moment
        v = β2 v + (1 - β2) g²                                  # Algorithm 2, second moment
        m̂ = m / (1 - β1^t),  v̂ = v / (1 - β2^t)                 # Algorithm 2, bias correction
        r = m̂ / (sqrt(v̂) + ε) + λ w                            # Algorithm 2, r_t + λ x_t
        ratio = min(||w|| / ||r||, max_trust_ratio)             # Algorithm 2, φ(||x_t||)/||·||
        w = w - η ratio r                                       # Algorithm 2, weight update

    The paper's scaling function ``φ`` is the identity here; the trust ratio itself is capped at
    ``max_trust_ratio`` (``None`` disables the cap), which bounds the step of a layer whose
    update norm is tiny. If ``||w|| == 0`` or ``||r|| == 0`` the ratio is 1, so zero-initialised
    layers still move and no ``0/0`` occurs; this choice is made on-device with
    :func:`torch.where`, so ``step`` never synchronises with the host. With
    ``bias_correction=False`` the moments are used as they are (``m̂ = m``, ``v̂ = v``).

    Excluding 1-D parameters:
        With ``exclude_1d=True`` (the default) every parameter with ``ndim <= 1`` -- biases and the
        affine parameters of normalisation layers -- gets no weight decay and a trust ratio of 1,
        i.e. a plain (bias-corrected) Adam step ``w = w - η m̂ / (sqrt(v̂) + ε)``. This follows the
        BERT recipe, which excludes these parameters from decay and adaptation.

    Per-group options:
        Each parameter group may override ``lr``, ``betas``, ``eps``, ``weight_decay``,
        ``bias_correction``, ``max_trust_ratio`` and ``exclude_1d``; overrides are validated like
        the constructor arguments.

    State (per parameter, saved by :meth:`state_dict`): ``step`` (a 0-dim float32 tensor on the
    parameter's device), ``exp_avg`` (``m``) and ``exp_avg_sq`` (``v``).

    Args:
        params: Iterable of parameters or of parameter-group dicts.
        lr: Learning rate ``η`` (``>= 0``).
        betas: ``(β1, β2)``, each in ``[0, 1)``.
        eps: ``ε`` (``>= 0``) added to ``sqrt(v̂)``.
        weight_decay: Decoupled weight decay ``λ`` (``>= 0``), added to the update before the
            trust ratio is computed.
        bias_correction: Divide the moments by ``1 - β^t``.
        max_trust_ratio: Upper bound on the trust ratio (``> 0``), or ``None`` for no bound.
        exclude_1d: Give parameters with ``ndim <= 1`` no weight decay and a trust ratio of 1.
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
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        max_trust_ratio: float | None = 10.0,
        exclude_1d: bool = True,
        exclude_norm_and_bias_from_weight_decay: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "max_trust_ratio": max_trust_ratio,
            "exclude_1d": exclude_1d,
        }
        _validate(defaults)
        super().__init__(
            decay_groups(params, exclude=exclude_norm_and_bias_from_weight_decay), defaults
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        _validate(group)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        """Algorithm 2 on one layer: one iteration of the ``for`` loop over ``t`` for ``x = p``."""
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq, step_t = self._moments(p)
        step_t += 1
        # Algorithm 2: m_t = β1 m_{t-1} + (1 - β1) g_t;  v_t = β2 v_{t-1} + (1 - β2) g_t².
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        if group["bias_correction"]:
            # Algorithm 2: m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t); exponent on-device.
            t = step_t.to(torch.promote_types(p.dtype, torch.float32))
            m_hat = exp_avg / (1 - torch.pow(beta1, t))
            v_hat = exp_avg_sq / (1 - torch.pow(beta2, t))
        else:
            m_hat, v_hat = exp_avg, exp_avg_sq
        # Algorithm 2: r_t = m̂ / (sqrt(v̂) + ε).
        update = m_hat / v_hat.sqrt().add_(group["eps"])

        if group["exclude_1d"] and p.ndim <= 1:
            # Excluded (bias / norm) parameter: no weight decay, trust ratio 1.
            p.sub_(update, alpha=group["lr"])
            return

        # Algorithm 2: r_t + λ x_t.
        if group["weight_decay"] != 0:
            update.add_(p, alpha=group["weight_decay"])
        # Algorithm 2: trust ratio φ(||x_t||) / ||r_t + λ x_t||, with φ = identity and the ratio
        # capped at max_trust_ratio; 1 when either norm is zero.
        w_norm = torch.linalg.vector_norm(p)
        r_norm = torch.linalg.vector_norm(update)
        ratio = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm))
        if group["max_trust_ratio"] is not None:
            ratio = ratio.clamp(max=group["max_trust_ratio"])
        # Algorithm 2: x_{t+1} = x_t - η ratio (r_t + λ x_t).
        p.sub_(update.mul_(ratio * group["lr"]))

    def _moments(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``m``, ``v`` and the step count ``t`` of ``p`` (created at zero; ``t`` on its device)."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if state["step"].device != p.device:  # e.g. state loaded from another device
            state["step"] = state["step"].to(p.device)
        return state["exp_avg"], state["exp_avg_sq"], state["step"]


def _validate(group: dict[str, Any]) -> None:
    """Check LAMB hyper-parameters of a parameter group (or of the defaults).

    Raises:
        ValueError: If a value is out of range; the message names the value.
    """
    check_shared_options(group, flags=("bias_correction", "exclude_1d"))
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair)")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    max_trust_ratio = group["max_trust_ratio"]
    if max_trust_ratio is not None and not 0.0 < max_trust_ratio:
        raise ValueError(f"Invalid max_trust_ratio value: {max_trust_ratio}")
