"""Levenberg–Marquardt adaptation of the damping λ (Martens & Grosse 2015, section 6.5).

Every ``T`` steps (``damping_adapt_every``) the step ``δ`` actually applied (after KL-clipping,
momentum and the learning rate) is judged by the reduction ratio

    ρ = (h(θ + δ) − h(θ)) / M(δ),     M(δ) = ½ δᵀ (F̂ + λI) δ + ∇hᵀ δ

and ``λ ← ω λ`` if ``ρ > 3/4``, ``λ ← λ / ω`` if ``ρ < 1/4``, with ``ω = (19/20)^T``; ``λ`` stays
in ``[1e-8, 1e4]``. Choices made here:

- ``δᵀ F̂ δ`` uses the K-FAC approximation itself, ``Σ_layers ⟨Δ, G Δ A⟩`` with the current
  (undamped) running factors (``A ≈ blockdiag(K ⊗ Ψ, 1)`` for doubly-factored layers); the
  parameters outside K-FAC layers contribute no curvature term beyond ``λ‖δ‖²``. No extra
  forward or backward pass is needed for it.
- ``h`` is the training objective the optimizer minimises: the closure's loss plus the coupled
  L2 term ``(η/2)‖θ‖²`` of ``weight_decay`` ``η``. Its exact change is added to
  ``h(θ + δ) − h(θ)`` and its gradient ``ηθ`` and curvature ``ηI`` to ``M``.
- ``h(θ + δ)`` comes from ``closure.evaluate()`` (forward only, same batch, averaged over ranks),
  so every rank computes the same ``ρ`` and the same ``λ``.
- ``M(δ) ≥ 0`` (no predicted decrease, e.g. momentum against the gradient, or a skipped step)
  counts as ``ρ = −∞``: more damping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from secondorder.optim.kfac.layers import KFACLayer
from secondorder.optim.kfac.precondition import curvature

__all__ = [
    "DAMPING_MAX",
    "DAMPING_MIN",
    "adapted_damping",
    "quadratic_model",
    "reduction_ratio",
]

DAMPING_MIN = 1e-8
DAMPING_MAX = 1e4


def reduction_ratio(change: float, predicted: float) -> float:
    """``ρ = change / predicted`` for a predicted decrease (``predicted < 0``), else ``-inf``."""
    if not (math.isfinite(change) and math.isfinite(predicted)) or predicted >= 0:
        return -math.inf
    return change / predicted


def adapted_damping(damping: float, rho: float, every: int) -> float:
    """The Levenberg–Marquardt rule with ``ω = (19/20)^every``, clamped to the bounds."""
    omega = (19.0 / 20.0) ** every
    if rho > 0.75:
        damping *= omega
    elif rho < 0.25:
        damping /= omega
    return min(max(damping, DAMPING_MIN), DAMPING_MAX)


def quadratic_model(
    layers: Sequence[KFACLayer],
    state: MutableMapping[Tensor, dict[str, Any]],
    param_groups: Sequence[Mapping[str, Any]],
    grads: Mapping[int, Tensor],
    deltas: Mapping[int, Tensor],
    *,
    loss_before: Tensor,
    loss_after: Tensor,
    damping: float,
) -> tuple[float, float]:
    """``(h(θ + δ) − h(θ), M(δ))`` for the applied step ``δ`` (one host sync).

    Args:
        layers: the K-FAC layers (their running factors give ``δᵀ F̂ δ``).
        state: the optimizer state holding those factors.
        param_groups: the optimizer's groups (``weight_decay`` ``η`` per group); parameters
            already hold ``θ + δ``.
        grads: ``id(p) -> ∇h + ηθ`` at ``θ``.
        deltas: ``id(p) -> δ``.
        loss_before: ``h(θ)`` without the L2 term (the closure's loss).
        loss_after: ``h(θ + δ)`` without the L2 term (``closure.evaluate()``).
        damping: ``λ``.
    """
    change = torch.as_tensor(loss_after - loss_before).double()
    quad, linear = torch.zeros_like(change), torch.zeros_like(change)
    for group in param_groups:
        wd = group["weight_decay"]
        for p in group["params"]:
            d = deltas.get(id(p))
            if d is None:
                continue
            flat = d.reshape(-1)
            squared = torch.dot(flat, flat).double()
            quad += (damping + wd) * squared
            linear += torch.dot(grads[id(p)].reshape(-1), flat).double()
            if wd:  # exact change of (η/2)‖θ‖² from θ = θ_new − δ to θ_new
                change += wd * (torch.dot(p.reshape(-1), flat).double() - 0.5 * squared)
    for layer in layers:
        layer_state = state[layer.weight]
        if id(layer.weight) in deltas and "G" in layer_state:
            delta_bias = deltas.get(id(layer.bias)) if layer.bias is not None else None
            quad += curvature(layer, deltas[id(layer.weight)], delta_bias, layer_state).double()
    values = torch.stack([change, 0.5 * quad + linear]).tolist()
    return values[0], values[1]
