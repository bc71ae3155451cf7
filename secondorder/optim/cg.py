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
    apply_a = _damped(matvec, damping)

    def precondition(v: Tensor) -> Tensor:  # y = M⁻¹ r
        return v / preconditioner if preconditioner is not None else v

    x, r, phi0, b_norm, products = _start(apply_a, b, x0)
    if b_norm == 0.0 or not math.isfinite(b_norm):
        reason: CGStop = "zero_rhs" if b_norm == 0.0 else "non_finite"
        return CGResult(x, x, 0, 0.0, reason, phi0, [phi0], [], products)
    res_norm = float(torch.linalg.vector_norm(r)) / b_norm if x0 is not None else 1.0
    track = _Progress([phi0], x, phi0, res_norm, store_iterates, iterate_growth)
    y = precondition(r)
    p, ry = y, torch.dot(r, y)
    stop, i = None, 0
    while i < max_iters:
        x_new, r_new, curvature, phi, r_norm = _update(apply_a, b, x, r, p, ry)
        products += 1
        stop = _breakdown(curvature, phi)
        if stop is None:  # accept the iterate
            i += 1
            x, r = x_new, r_new
            track.accept(i, x, phi, r_norm / b_norm)
            stop = _converged(i, track.phis, r_norm / b_norm, tol=tol, progress_eps=progress_eps)
        if stop is not None:
            break
        y = precondition(r)
        ry_new = torch.dot(r, y)
        p = y + (ry_new / ry) * p
        ry = ry_new
    return track.result(x, i, stop or "max_iters", products)


def _damped(matvec: Callable[[Tensor], Tensor], damping: float) -> Callable[[Tensor], Tensor]:
    """``v ↦ (C + λI) v``."""
    if damping < 0:
        raise ValueError(f"Invalid damping: {damping}")

    def apply_a(v: Tensor) -> Tensor:
        out = matvec(v)
        return out + damping * v if damping else out

    return apply_a


def _update(
    apply_a: Callable[[Tensor], Tensor], b: Tensor, x: Tensor, r: Tensor, p: Tensor, ry: Tensor
) -> tuple[Tensor, Tensor, float, float, float]:
    """One CG update along ``p``: ``x + αp``, ``r − αAp`` and, in one host sync, ``pᵀAp``,
    ``φ(x + αp)`` and ``‖r − αAp‖``."""
    ap = apply_a(p)
    p_ap = torch.dot(p, ap)
    alpha = ry / p_ap
    x_new, r_new = x + alpha * p, r - alpha * ap
    phi_t = -0.5 * torch.dot(x_new, b + r_new)
    r_norm_t = torch.linalg.vector_norm(r_new)
    curvature, phi, r_norm = torch.stack([p_ap, phi_t, r_norm_t]).tolist()
    return x_new, r_new, curvature, phi, r_norm


def _breakdown(curvature: float, phi: float) -> CGStop | None:
    """``A`` not positive definite along ``p`` (or round-off blew up): keep the last iterate."""
    if not math.isfinite(curvature) or not math.isfinite(phi):
        return "non_finite"
    if curvature <= 0.0:
        return "negative_curvature"
    return None


def _start(
    apply_a: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None
) -> tuple[Tensor, Tensor, float, float, int]:
    """``(x_0, r_0, φ(x_0), ‖b‖, products)``: the warm start if it beats zero, else zero."""
    b_norm_t = torch.linalg.vector_norm(b)
    if x0 is None:
        return torch.zeros_like(b), b.clone(), 0.0, float(b_norm_t), 0
    r = b - apply_a(x0)
    phi_t = -0.5 * torch.dot(x0, b + r)
    b_norm, phi0 = torch.stack([b_norm_t, phi_t]).tolist()
    if not phi0 < 0.0:  # warm start no better than zero (or non-finite): start afresh
        return torch.zeros_like(b), b.clone(), 0.0, b_norm, 1
    return x0, r, phi0, b_norm, 1


def _converged(
    i: int, phis: list[float], res_norm: float, *, tol: float, progress_eps: float | None
) -> CGStop | None:
    """The residual test, then Martens' relative progress over the last ``k`` iterations."""
    if res_norm <= tol:
        return "tolerance"
    k = max(10, math.ceil(0.1 * i))
    phi = phis[i]
    if (
        progress_eps is not None
        and i > k
        and phi < 0
        and (phi - phis[i - k]) / phi < k * progress_eps
    ):
        return "relative_progress"
    return None


@dataclass
class _Progress:
    """The accepted iterates' record: ``φ`` history, the best iterate, the stored iterates."""

    phis: list[float]
    best_x: Tensor
    best_phi: float
    best_res: float
    store_iterates: bool
    iterate_growth: float
    iterates: list[tuple[int, Tensor]] = field(default_factory=list)
    next_store: int = 1
    store_index: int = 0

    def accept(self, i: int, x: Tensor, phi: float, res_norm: float) -> None:
        self.phis.append(phi)
        if phi <= self.best_phi + _PHI_SLACK * abs(self.best_phi):  # later wins: lower residual
            self.best_x, self.best_phi, self.best_res = x, phi, res_norm
        if self.store_iterates and i == self.next_store:
            self.iterates.append((i, x))
            while math.ceil(self.iterate_growth**self.store_index) <= i:
                self.store_index += 1
            self.next_store = math.ceil(self.iterate_growth**self.store_index)

    def result(self, x: Tensor, i: int, reason: CGStop, products: int) -> CGResult:
        """The :class:`CGResult`, the final iterate stored too (for backtracking)."""
        if self.store_iterates and (not self.iterates or self.iterates[-1][0] != i) and i > 0:
            self.iterates.append((i, x))
        return CGResult(
            self.best_x,
            x,
            i,
            self.best_res,
            reason,
            self.best_phi,
            self.phis,
            self.iterates,
            products,
        )
