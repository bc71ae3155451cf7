"""Preconditioned conjugate gradient for the damped Newton system ``(C + λI) d = −g``.

Implements CG as used by Hessian-free optimisation — Martens 2010, "Deep learning via
Hessian-free optimization" (Sec. 4: Algorithm 1's inner loop with the details of Secs. 4.4-4.8) —
and by the Newton-CG of Reiz et al. 2022, "Training Large-Scale Neural Networks with a Newton
Conjugate Gradient Method" (their CG box). The standard preconditioned CG recurrences are those
of Nocedal & Wright, "Numerical Optimization", Algorithm 5.3.

Symbols: ``A = C + λI`` the damped curvature (``C``: Hessian, GGN, ...; ``λ``: Tikhonov damping,
the poster's ``τ``), ``b = −g`` the right-hand side, ``x_i`` the iterates, ``r_i = b − A x_i`` the
residual, ``M`` a diagonal preconditioner (``y_i = M⁻¹ r_i``), ``p_i`` the search directions,
``φ(x) = ½ xᵀAx − bᵀx = ½ xᵀAx + gᵀx`` the quadratic model CG minimises.

What goes beyond textbook CG:

- **Martens' relative-progress stop** (Sec. 4.4): stop at iteration ``i`` once ``i > k``,
  ``φ(x_i) < 0`` and ``(φ(x_i) − φ(x_{i−k})) / φ(x_i) < k ε`` with ``k = max(10, ⌈0.1 i⌉)``,
  ``ε = 5e-4`` — next to the usual ``‖r‖ ≤ tol ‖b‖`` and an iteration cap.
- **Warm start** (Sec. 4.5): ``x_0`` is the caller's previous solution times a decay; if the warm
  start is no better than zero (``φ(x_0) ≥ 0``) CG restarts from zero.
- **Negative curvature**: ``p_iᵀ A p_i ≤ 0`` (or non-finite) means ``A`` is not positive
  definite along ``p_i``; CG stops and returns the last good iterate, never a garbage step.
- **Best iterate** ("CG-iterate backtracking", Sec. 4.6): the returned solution is the iterate
  with the lowest model value ``φ`` (in exact arithmetic the last one; this guards against
  round-off; a later iterate within a relative 1e-6 of the best wins, for its lower residual).
  Martens' backtracking on the *loss* needs the objective, so it is the optimizer's: with
  ``store_iterates`` CG keeps ``x_i`` at ``i = ⌈γ^j⌉`` (``γ = 1.3``) and the final one.
- ``φ(x_i) = −½ x_iᵀ(b + r_i)`` comes from vectors CG already has: no extra product.

Host synchronisation: one per iteration (the curvature ``pᵀAp``, ``φ`` and ``‖r‖`` are read
together in one transfer to decide whether to stop), plus one at the start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = ["CGResult", "CGStop", "conjugate_gradient", "martens_preconditioner"]

CGStop = Literal[
    "tolerance", "relative_progress", "max_iters", "negative_curvature", "non_finite", "zero_rhs"
]


@dataclass
class CGResult:
    """What :func:`conjugate_gradient` returns.

    Attributes:
        solution: the iterate with the lowest model value ``φ`` (the step direction ``d``).
        final: the last accepted iterate (Martens warm-starts the next solve from it).
        iterations: CG iterations taken (curvature products, not counting a warm-start one).
        relative_residual: ``‖b − A x‖ / ‖b‖`` at ``solution`` (recurrence residual).
        reason: why CG stopped.
        model_value: ``φ(solution) = ½ dᵀAd + gᵀd`` (≤ 0 unless the warm start was all we had).
        model_values: ``φ(x_0), φ(x_1), ...`` for every accepted iterate.
        iterates: ``(i, x_i)`` kept for backtracking when ``store_iterates`` (else empty).
        products: curvature products used, including the warm start's residual.
    """

    solution: Tensor
    final: Tensor
    iterations: int
    relative_residual: float
    reason: CGStop
    model_value: float
    model_values: list[float] = field(default_factory=list)
    iterates: list[tuple[int, Tensor]] = field(default_factory=list)
    products: int = 0


_PHI_SLACK = 1e-6  # φ differences below this relative size are round-off, not progress


def martens_preconditioner(diagonal: Tensor, damping: float, *, exponent: float = 0.75) -> Tensor:
    """``M = (diag(F̂) + λ)^α`` (Martens 2010, Sec. 4.7; ``α = 0.75``).

    ``diagonal`` is the empirical-Fisher diagonal ``(1/N) Σ_n g_n ⊙ g_n`` (see
    :func:`secondorder.optim.curvature.empirical_fisher_diagonal`).
    """
    return (diagonal + damping).pow(exponent)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    damping: float = 0.0,
    x0: Tensor | None = None,
    max_iters: int = 50,
    tol: float = 1e-6,
    progress_eps: float | None = 5e-4,
    preconditioner: Tensor | None = None,
    store_iterates: bool = False,
    iterate_growth: float = 1.3,
) -> CGResult:
    """Approximately solve ``(C + λI) x = b`` by preconditioned CG.

    Args:
        matvec: ``v ↦ C v`` on flat vectors (collectives, if any, inside).
        b: the right-hand side, ``−g`` for a Newton step.
        damping: ``λ`` (added here, so ``matvec`` is the undamped curvature).
        x0: warm start (already decayed by the caller); ``None`` starts from zero.
        max_iters: iteration cap.
        tol: stop once ``‖r‖ ≤ tol ‖b‖``.
        progress_eps: Martens' ``ε``; ``None`` disables the relative-progress stop.
        preconditioner: the diagonal of ``M`` (positive), or ``None``.
        store_iterates: keep ``x_i`` at ``i = ⌈γ^j⌉`` and the final one for backtracking.
        iterate_growth: ``γ``.

    Returns:
        A :class:`CGResult`.
    """
    if max_iters < 1:
        raise ValueError(f"Invalid max_iters: {max_iters}")
    if damping < 0:
        raise ValueError(f"Invalid damping: {damping}")

    def apply_a(v: Tensor) -> Tensor:
        out = matvec(v)
        return out + damping * v if damping else out

    products = 0
    b_norm_t = torch.linalg.vector_norm(b)
    if x0 is not None:
        x = x0
        r = b - apply_a(x0)
        products += 1
        phi_t = -0.5 * torch.dot(x, b + r)
        b_norm, phi0 = torch.stack([b_norm_t, phi_t]).tolist()
        if not phi0 < 0.0:  # warm start no better than zero (or non-finite): start afresh
            x, r, phi0 = torch.zeros_like(b), b.clone(), 0.0
    else:
        x, r, phi0 = torch.zeros_like(b), b.clone(), 0.0
        b_norm = float(b_norm_t)
    if b_norm == 0.0 or not math.isfinite(b_norm):
        reason: CGStop = "zero_rhs" if b_norm == 0.0 else "non_finite"
        return CGResult(x, x, 0, 0.0, reason, phi0, [phi0], [], products)

    y = r / preconditioner if preconditioner is not None else r
    p = y
    ry = torch.dot(r, y)
    phis = [phi0]
    best_x, best_phi = x, phi0
    res_norm = float(torch.linalg.vector_norm(r)) / b_norm if x0 is not None else 1.0
    best_res = res_norm
    iterates: list[tuple[int, Tensor]] = []
    next_store, store_index = 1, 0
    reason = "max_iters"
    i = 0
    while i < max_iters:
        ap = apply_a(p)
        products += 1
        p_ap = torch.dot(p, ap)
        alpha = ry / p_ap
        x_new = x + alpha * p
        r_new = r - alpha * ap
        phi_new_t = -0.5 * torch.dot(x_new, b + r_new)
        r_norm_t = torch.linalg.vector_norm(r_new)
        curvature, phi_new, r_norm = torch.stack([p_ap, phi_new_t, r_norm_t]).tolist()  # 1 sync
        if not math.isfinite(curvature) or not math.isfinite(phi_new):
            reason = "non_finite"
            break
        if curvature <= 0.0:
            reason = "negative_curvature"
            break
        i += 1
        x, r = x_new, r_new
        res_norm = r_norm / b_norm
        phis.append(phi_new)
        if phi_new <= best_phi + _PHI_SLACK * abs(best_phi):  # later wins ties: lower residual
            best_x, best_phi, best_res = x, phi_new, res_norm
        if store_iterates and i == next_store:
            iterates.append((i, x))
            while math.ceil(iterate_growth**store_index) <= i:
                store_index += 1
            next_store = math.ceil(iterate_growth**store_index)
        if res_norm <= tol:
            reason = "tolerance"
            break
        k = max(10, math.ceil(0.1 * i))
        if progress_eps is not None and i > k and phi_new < 0:
            if (phi_new - phis[i - k]) / phi_new < k * progress_eps:
                reason = "relative_progress"
                break
        y = r / preconditioner if preconditioner is not None else r
        ry_new = torch.dot(r, y)
        p = y + (ry_new / ry) * p
        ry = ry_new
    if store_iterates and (not iterates or iterates[-1][0] != i) and i > 0:
        iterates.append((i, x))
    return CGResult(best_x, x, i, best_res, reason, best_phi, phis, iterates, products)
