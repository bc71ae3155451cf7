"""The Neumann optimizer: an implicit mini-batch inverse Hessian from gradients only.

Implements Krishnan, Xiao & Saurous (2018), "Neumann Optimizer: A Practical Optimization
Algorithm for Deep Neural Networks" (ICLR 2018, arXiv:1712.03298): Algorithm 2 with the
hyperparameters of its Table 1 as :class:`Neumann`, and the idealised inner loop of Algorithm 1
as :func:`idealized_neumann_step`. One gradient per step, two buffers per parameter (like Adam).

Symbols (the paper's): ``w`` the iterate of Algorithm 2, i.e. the *displaced* weights (real
weights plus ``μm``, Section 3.2; the real weights are ``w - μm``), ``m`` the Neumann iterate,
``v`` the moving average of the weights, ``η`` the learning rate (``group["lr"]``, set by the
trainer's schedule), ``μ`` the momentum, ``α``/``β`` the cubic/repulsive regularisers, ``γ`` the
moving-average rate, ``K`` the reset interval.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from secondorder.optim.global_state import GlobalStateOptimizer

__all__ = ["Neumann", "idealized_neumann_step", "neumann_momentum", "regularizer_coefficient"]


def idealized_neumann_step(
    gradient_at: Callable[[Tensor], Tensor],
    w: Tensor,
    *,
    inner_lr: float,
    outer_lr: float,
    inner_steps: int,
) -> Tensor:
    """One outer iteration of Algorithm 1 (idealised Neumann optimizer) on a fixed mini-batch.

    Lines 3-6 of Algorithm 1::

        m_0 = -∇f̂(w_t)                               # line 3
        m_k = m_{k-1} - ∇f̂(w_t + η_in m_{k-1})       # line 5, k = 1..K
        w_{t+1} = w_t + η_out m_K                     # line 6

    On a quadratic with Hessian ``H`` (``0 < η_in λ(H) < 1``), line 5 is the Richardson
    iteration of equation 7, ``m_k = (I - η_in H) m_{k-1} - ∇f̂``, so
    ``m_K = -Σ_{i=0}^{K} (I - η_in H)^i ∇f̂ → -(η_in H)^{-1} ∇f̂`` and, with ``η_out = η_in``, the
    step ``η_out m_K`` tends to the Newton step ``-H^{-1} ∇f̂``.

    Args:
        gradient_at: ``∇f̂`` of the fixed mini-batch at a flat weight vector.
        w: the flat weights ``w_t``.
        inner_lr: ``η_in``.
        outer_lr: ``η_out``.
        inner_steps: ``K``.

    Returns:
        The new weights ``w_{t+1}``.
    """
    m = -gradient_at(w)
    for _ in range(inner_steps):
        m = m - gradient_at(w + inner_lr * m)
    return w + outer_lr * m


def neumann_momentum(
    neumann_step: int, *, steps_per_epoch: int, mu_min: float, mu_max: float
) -> float:
    """Table 1's momentum ``μ(t) ∝ 1 - 1/(1 + t)``, from ``mu_min`` (0.5) up to ``mu_max`` (0.9).

    ``t = 1 + neumann_step / steps_per_epoch`` is the (fractional) epoch of the Neumann phase,
    counted from 1 like Algorithm 2's ``t``; ``neumann_step`` counts the steps taken since the SGD
    warm-up ended (0 at the first Neumann step). So ``μ = 0.5`` at the first Neumann step and
    reaches 0.9 eight epochs later: ``μ(t) = clip(1 - 1/(1 + t), mu_min, mu_max)``.
    """
    t = 1.0 + neumann_step / steps_per_epoch
    return min(mu_max, max(mu_min, 1.0 - 1.0 / (1.0 + t)))


def regularizer_coefficient(distance_sq: Tensor, *, alpha: float, beta: float) -> Tensor:
    """The scalar ``c`` with ``∇(α/3 ||x||³ + β/||x||) = c x`` for ``x = w - v``.

    Section 3.1 regularises ``ĝ(w) = f̂(w) + α/3 ||w - v||³ + β/||w - v||``, whose gradient is
    (Algorithm 2, line 9; equation 8 prints one extra ``1/||x||``, a typo the gradient disproves)::

        ∇ĝ(w) = ∇f̂(w) + (α ||x||² - β/||x||²) x / ||x||,   c = α ||x|| - β / ||x||³

    ``c = 0`` where ``x = 0`` (the repulsive term is undefined there). On device, no host sync.

    Args:
        distance_sq: ``||x||²`` (0-d tensor).
        alpha: cubic regulariser ``α``.
        beta: repulsive regulariser ``β`` (already multiplied by the number of variables).
    """
    distance = distance_sq.sqrt()
    coefficient = alpha * distance - beta / (distance_sq * distance)
    return torch.where(distance_sq > 0, coefficient, torch.zeros_like(coefficient))


class Neumann(GlobalStateOptimizer):
    """Neumann optimizer (Krishnan, Xiao & Saurous 2018, Algorithm 2).

    Each call of :meth:`step` evaluates one stochastic gradient ``∇f̂`` at the current ``w`` (a
    fresh mini-batch per inner iteration: the inner and outer loops are flattened, Section 3.2)
    and applies one of three updates, counting optimizer steps ``k = 0, 1, ...``:

    - SGD warm-up (line 2), ``k < warmup_steps``: ``w ← w - η ∇f̂``; ``m`` stays 0 and ``v``
      stays ``w_0`` (line 1 initialises ``v_0 = w_0``, ``m_0 = 0`` before the warm-up).
    - Neumann steps, ``s = k - warmup_steps``, with ``μ = μ(s)`` (:func:`neumann_momentum`)::

          if s is a reset step:                                   # line 6
              m ← -η ∇f̂, i.e. d = ∇f̂ and m_{t-1} = 0             # line 7
          else:
              d = ∇f̂ + c (w - v), c from regularizer_coefficient  # line 9
              m ← μ m - η d                                        # line 10
          w ← w + μ m - η d                                        # line 11
          v ← w + γ (v - w)                                        # line 12

      Reset steps are ``s = 0, K_0, 3K_0, 7K_0, ...``: ``K`` starts at ``reset_steps`` and
      doubles after every reset (Table 1). Lines 11-12 run on reset steps too (the paper's box is
      ambiguous); this makes the real weights ``w - μm`` take an SGD step at a reset, and makes
      Algorithm 2 with ``α = β = μ = 0`` exactly SGD.
    - The weights to evaluate and return are ``w - μ m`` (line 13): use :meth:`evaluation_weights`.

    The norms ``||w - v||`` run over all parameters of a parameter group (with one group: the
    paper's whole weight vector ``w ∈ R^n``), and ``β = beta_per_variable * n`` with ``n`` the
    group's number of scalars (Table 1: ``β = 1e-5 × number of variables``).

    Data parallel: the closure averages the gradient over ranks; every other quantity is computed
    identically on every rank, so no further communication is needed.

    State: per parameter ``neumann_iterate`` (``m``) and ``moving_average`` (``v``); in
    ``global_state`` (:mod:`secondorder.optim.global_state`) the step count ``k``, the Neumann
    step of the next reset, the current ``K`` and the last ``μ`` (the evaluation weights are
    ``w - μ m``).

    Args:
        params: parameters or parameter groups.
        lr: learning rate ``η`` (the only hyperparameter to tune).
        alpha: cubic regulariser ``α`` (Table 1: 1e-7).
        beta_per_variable: repulsive regulariser per scalar variable (Table 1: 1e-5).
        gamma: moving average rate ``γ`` (Table 1: 0.99).
        mu_min: momentum at the start of the Neumann phase (Table 1: 0.5).
        mu_max: peak momentum (Table 1: 0.9).
        momentum: overrides Table 1's ``μ(t)``: a constant, or a function of the Neumann step
            ``s`` (0-based). ``None`` uses :func:`neumann_momentum`.
        warmup_steps: SGD warm-up steps (Table 1: 5 epochs).
        reset_steps: the first reset interval ``K_0`` in steps (Table 1: 10 epochs).
        steps_per_epoch: converts steps to the epochs in which ``μ(t)`` is stated.

    Raises:
        ValueError: if a hyperparameter is out of range; the message names the value.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        alpha: float = 1e-7,
        beta_per_variable: float = 1e-5,
        gamma: float = 0.99,
        mu_min: float = 0.5,
        mu_max: float = 0.9,
        momentum: float | Callable[[int], float] | None = None,
        warmup_steps: int = 0,
        reset_steps: int = 1,
        steps_per_epoch: int = 1,
    ) -> None:
        if not 0.0 <= mu_min <= mu_max < 1.0:
            raise ValueError(
                f"Invalid momentum range: need 0 <= mu_min={mu_min} <= mu_max={mu_max} < 1"
            )
        if isinstance(momentum, (int, float)) and not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps value: {warmup_steps!r}")
        if isinstance(reset_steps, bool) or not isinstance(reset_steps, int) or reset_steps < 1:
            raise ValueError(f"Invalid reset_steps value: {reset_steps!r}")
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"Invalid steps_per_epoch value: {steps_per_epoch!r}")
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "beta_per_variable": beta_per_variable,
            "gamma": gamma,
        }
        _validate(defaults)
        super().__init__(params, defaults)
        self.mu_min, self.mu_max = mu_min, mu_max
        self.momentum = momentum
        self.warmup_steps = warmup_steps
        self.reset_steps = reset_steps
        self.steps_per_epoch = steps_per_epoch
        self.init_global_state(next_reset=0, reset_interval=reset_steps, mu=0.0)
        self.diagnostics: dict[str, float | Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, validating its hyperparameter overrides."""
        super().add_param_group(param_group)
        _validate(self.param_groups[-1])

    def _momentum_at(self, neumann_step: int) -> float:
        if self.momentum is None:
            return neumann_momentum(
                neumann_step,
                steps_per_epoch=self.steps_per_epoch,
                mu_min=self.mu_min,
                mu_max=self.mu_max,
            )
        if callable(self.momentum):
            return float(self.momentum(neumann_step))
        return float(self.momentum)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of Algorithm 2 (one gradient).

        Args:
            closure: computes the (rank-averaged) gradient and returns the loss; ``None`` uses
                the gradients already in ``p.grad``.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        counters = self.global_state
        warmup = counters["step"] < self.warmup_steps
        neumann_step = counters["step"] - self.warmup_steps
        reset = not warmup and neumann_step == counters["next_reset"]
        mu = 0.0 if warmup else self._momentum_at(neumann_step)
        distances = [
            self._update_group(g, warmup=warmup, reset=reset, mu=mu) for g in self.param_groups
        ]
        if reset:  # K doubles after every reset (Table 1)
            counters["next_reset"] += counters["reset_interval"]
            counters["reset_interval"] *= 2
        counters["mu"] = mu
        counters["step"] += 1
        self.diagnostics = {"neumann_mu": mu, "neumann_reset": float(reset)}
        distances = [d for d in distances if d is not None]
        if distances:
            self.diagnostics["neumann_distance"] = distances[0]
        return loss

    def _update_group(
        self, group: dict[str, Any], *, warmup: bool, reset: bool, mu: float
    ) -> Tensor | None:
        """Lines 2 or 6-12 on one group; returns ``||w - v||`` where line 9 needs it."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        grads = [p.grad for p in params]
        for p in params:
            state = self.state[p]
            if not state:  # line 1: v_0 = w_0, m_0 = 0
                state["neumann_iterate"] = torch.zeros_like(p)
                state["moving_average"] = p.detach().clone()
        lr = group["lr"]
        if warmup:  # line 2: vanilla SGD
            torch._foreach_add_(params, grads, alpha=-lr)
            return None
        iterates = [self.state[p]["neumann_iterate"] for p in params]
        averages = [self.state[p]["moving_average"] for p in params]
        distance = None
        if reset:  # line 7: m = -η ∇f̂ (d = ∇f̂)
            direction = grads
            torch._foreach_zero_(iterates)
        else:  # line 9: d = ∇f̂ + c (w - v)
            offsets = torch._foreach_sub(params, averages)
            distance_sq = torch.stack(torch._foreach_norm(offsets)).square().sum()
            distance = distance_sq.sqrt()
            beta = group["beta_per_variable"] * sum(p.numel() for p in group["params"])
            coefficient = regularizer_coefficient(distance_sq, alpha=group["alpha"], beta=beta)
            torch._foreach_mul_(offsets, coefficient)
            torch._foreach_add_(offsets, grads)
            direction = offsets
            torch._foreach_mul_(iterates, mu)  # line 10: m = μ m - η d
        torch._foreach_add_(iterates, direction, alpha=-lr)
        torch._foreach_add_(params, iterates, alpha=mu)  # line 11: w = w + μ m - η d
        torch._foreach_add_(params, direction, alpha=-lr)
        torch._foreach_lerp_(averages, params, 1.0 - group["gamma"])  # line 12
        return distance

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """Swap in the weights ``w - μ m`` of Algorithm 2, line 13; restore ``w`` exactly after.

        The iterate ``w`` is copied aside (not recomputed as ``(w - μm) + μm``, which rounds), so
        training resumes bitwise from where it was.
        """
        pairs = [
            (p, self.state[p]["neumann_iterate"])
            for group in self.param_groups
            for p in group["params"]
            if "neumann_iterate" in self.state[p]
        ]
        mu = self.global_state["mu"]
        if mu == 0.0 or not pairs:
            yield
            return
        with torch.no_grad():
            displaced = [p.detach().clone() for p, _ in pairs]
            torch._foreach_add_([p for p, _ in pairs], [m for _, m in pairs], alpha=-mu)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in pairs], displaced)


def _validate(group: dict[str, Any]) -> None:
    """Check the per-group hyperparameters; the message names the bad value."""
    lr = group["lr"]
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not group["alpha"] >= 0.0:
        raise ValueError(f"Invalid alpha (cubic regulariser) value: {group['alpha']}")
    if not group["beta_per_variable"] >= 0.0:
        raise ValueError(f"Invalid beta_per_variable value: {group['beta_per_variable']}")
    if not 0.0 <= group["gamma"] < 1.0:
        raise ValueError(f"Invalid gamma (moving average) value: {group['gamma']}")
