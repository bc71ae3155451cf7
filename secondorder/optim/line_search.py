"""Step lengths for a Newton-type direction, tried on the loss: CG-iterate backtracking, Armijo.

Implements the step-length half of the Newton-CG step in :mod:`secondorder.optim.newton_cg`:
Martens 2010, "Deep learning via Hessian-free optimization", Sec. 4.6 (walk the stored CG
iterates back while the loss decreases), then Armijo backtracking (Nocedal & Wright, "Numerical
Optimization", Algorithm 3.1: halve ``t`` until ``L(θ + t d) ≤ L + c₁ t gᵀd``) or a fixed
``t = lr``. Symbols: ``θ`` flat parameters, ``g`` gradient, ``d`` direction, ``C`` curvature,
``λ`` damping, ``φ`` CG's model value.

Every trial loss is ``closure.evaluate()`` (forward only, averaged over ranks, one host sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from secondorder.optim.cg import CGResult
from secondorder.optim.flat import flatten, set_flat

__all__ = ["NewtonStep", "backtrack_cg_iterates", "step_length"]


@dataclass
class NewtonStep:
    """One step's direction: ``g``, ``d``, ``gᵀd``, ``dᵀCd``, ``λ``, the CG result, Armijo tries."""

    g: Tensor
    d: Tensor
    gd: float
    d_cd: float
    damping: float
    cg: CGResult
    fallback: bool
    tries: int = 0


def step_length(
    params: list[nn.Parameter], closure: Any, group: dict[str, Any], step: NewtonStep, loss0: float
) -> tuple[float, float | None]:
    """CG-iterate backtracking, then Armijo (or ``t = lr``); leaves ``θ = θ₀ + t d``.

    Reads ``lr``, ``cg_backtracking``, ``line_search``, ``adapt_damping``, ``max_line_search``
    and ``armijo_c1`` from ``group``.

    Returns:
        ``(t, L(θ₀ + t d) or None)``; ``t = 0`` when rejected (``θ = θ₀``).
    """
    theta0 = flatten([p.detach() for p in params])
    t = group["lr"]
    if group["cg_backtracking"] and not step.fallback and step.cg.iterates:
        backtrack_cg_iterates(params, closure, theta0, step, t)
    if not group["line_search"]:
        set_flat(params, theta0 + t * step.d)
        if not group["adapt_damping"]:
            return t, None
        return t, float(closure.evaluate())
    for _ in range(group["max_line_search"]):
        step.tries += 1
        set_flat(params, theta0 + t * step.d)
        trial = float(closure.evaluate())
        if trial <= loss0 + group["armijo_c1"] * t * step.gd:  # Armijo; False for NaN
            return t, trial
        t *= 0.5
    set_flat(params, theta0)  # rejected: θ unchanged
    return 0.0, None


def backtrack_cg_iterates(
    params: list[nn.Parameter], closure: Any, theta0: Tensor, step: NewtonStep, lr: float
) -> None:
    """Martens 2010 Sec. 4.6: walk the stored CG iterates back while the loss decreases.

    Replaces ``step.d`` (and ``gᵀd``, ``dᵀCd`` from the iterate's ``φ``); leaves ``θ = θ₀``.
    """
    iterates = step.cg.iterates
    best_i, best_x = iterates[-1]
    set_flat(params, theta0 + lr * best_x)
    best_loss = float(closure.evaluate())
    for i, x in reversed(iterates[:-1]):
        set_flat(params, theta0 + lr * x)
        trial = float(closure.evaluate())
        if not trial < best_loss:
            break
        best_i, best_x, best_loss = i, x, trial
    set_flat(params, theta0)
    step.d, step.gd = best_x, float(step.g @ best_x)
    phi = step.cg.model_values[best_i]
    step.d_cd = 2.0 * (phi - step.gd) - step.damping * float(best_x @ best_x)
