"""The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An Empirical Model
of Large-Batch Training", Appendix A.1).

A gradient averaged over a batch of B independent examples has ``E|g_B|² = |G|² + tr(Σ) / B``
(``G``: the true gradient, ``Σ``: the per-example gradient covariance). Squared gradient norms at
two batch sizes ``B_small < B_big`` therefore give unbiased estimates of both parts (eq. A.2)::

    |G|²  ≈ (B_big |g_big|² - B_small |g_small|²) / (B_big - B_small)
    tr(Σ) ≈ (|g_small|² - |g_big|²) / (1 / B_small - 1 / B_big)

Data-parallel training has both norms almost for free: ``g_big`` is the all-reduced global
gradient; ``g_small`` is each rank's gradient before the all-reduce (``|g_small|²`` the mean over
ranks of the squared norms: one scalar all-reduce), or, on one process with gradient
accumulation, each micro-batch's gradient. Each estimate is noisy, and their ratio is biased, so
the paper smooths the two parts separately (an exponential moving average here, bias-corrected as
Adam's moments are) and takes the ratio of the smoothed values.

Reading it: the critical batch B_crit ≈ B_simple. Below it doubling the batch nearly halves the
steps to a given loss; above it the steps stop falling (README, "Gradient noise scale").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["NoiseScaleMeter", "estimates", "meter_for", "small_batch_source"]


def estimates(
    small_sq_norm: float, big_sq_norm: float, *, small_batch: int, big_batch: int
) -> tuple[float, float]:
    """One step's unbiased estimates ``(|G|², tr(Σ))`` from the two squared gradient norms.

    Args:
        small_sq_norm: ``|g_small|²``, the mean squared norm of gradients of ``small_batch``
            examples each.
        big_sq_norm: ``|g_big|²``, the squared norm of the gradient of ``big_batch`` examples.
    """
    if not 0 < small_batch < big_batch:
        raise ValueError(f"need 0 < small_batch < big_batch, got {small_batch}, {big_batch}")
    # E|g_B|² = |G|² + tr(Σ)/B at B = small_batch and big_batch: two equations, two unknowns.
    grad_sq = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
    return grad_sq, trace


def small_batch_source(*, world_size: int, accumulation_steps: int) -> str | None:
    """Where ``g_small`` comes from: ``"rank"`` (the per-rank gradient, on more than one rank),
    ``"micro_batch"`` (one process with gradient accumulation) or ``None`` (no such gradient)."""
    if world_size > 1:
        return "rank"
    if accumulation_steps >= 2:
        return "micro_batch"
    return None


def meter_for(settings: Any, plan: Any, *, world_size: int) -> NoiseScaleMeter | None:
    """The trainer's meter for its :class:`TrainerSettings` and batch plan (``None`` when
    ``noise_scale_every`` is 0): ``g_small`` is the per-rank gradient on more than one rank,
    else the micro-batch gradient."""
    if not settings.noise_scale_every:
        return None
    source = small_batch_source(world_size=world_size, accumulation_steps=plan.accumulation_steps)
    if source is None:
        raise ValueError("the noise scale needs more than one rank or gradient accumulation")
    return NoiseScaleMeter(
        small_batch=plan.global_batch // world_size if source == "rank" else plan.micro_batch,
        big_batch=plan.global_batch,
        smoothing=settings.noise_scale_smoothing,
        every=settings.noise_scale_every,
        source=source,
    )


@dataclass
class _Average:
    """Bias-corrected exponential moving average: ``value = m / (1 - decay^count)``."""

    decay: float
    m: float = 0.0
    count: int = 0

    def update(self, x: float) -> None:
        self.m = self.decay * self.m + (1.0 - self.decay) * x
        self.count += 1

    @property
    def value(self) -> float | None:
        if self.count == 0:
            return None
        return self.m / (1.0 - self.decay**self.count)


class NoiseScaleMeter:
    """Smoothed estimates of |G|², tr(Σ) and B_simple from each measured step's two norms.

    Args:
        small_batch: examples behind each ``g_small`` (per-rank batch or micro-batch).
        big_batch: examples behind ``g_big`` (the global batch).
        smoothing: decay of the moving averages, per measured step (0 keeps only the last).
        every: measure every this many steps (see :meth:`measures`).
        source: where ``g_small`` comes from (see :func:`small_batch_source`).
    """

    def __init__(
        self,
        *,
        small_batch: int,
        big_batch: int,
        smoothing: float = 0.9,
        every: int = 1,
        source: str = "rank",
    ):
        if not 0 < small_batch < big_batch:
            raise ValueError(f"need 0 < small_batch < big_batch, got {small_batch}, {big_batch}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"Invalid smoothing: {smoothing} (0 <= smoothing < 1)")
        self.small_batch, self.big_batch = small_batch, big_batch
        self.every, self.source = every, source
        self.grad_sq = _Average(smoothing)
        self.trace = _Average(smoothing)

    def update(self, small_sq_norm: float, big_sq_norm: float) -> None:
        """Add one step's ``|g_small|²`` (mean over ranks or micro-batches) and ``|g_big|²``."""
        grad_sq, trace = estimates(
            small_sq_norm, big_sq_norm, small_batch=self.small_batch, big_batch=self.big_batch
        )
        if math.isfinite(grad_sq) and math.isfinite(trace):  # a float16 overflow is no sample
            self.grad_sq.update(grad_sq)
            self.trace.update(trace)

    def measures(self, step: int) -> bool:
        """Whether step ``step`` (counted from 1) is measured."""
        return step % self.every == 0

    def closure_options(self) -> dict[str, bool]:
        """``BatchClosure`` arguments that make a closure measure what :meth:`update_from_closure`
        reads."""
        if self.source == "rank":
            return {"measure_local_grad": True}
        return {"measure_micro_grads": True}

    def update_from_closure(self, closure: Any, comm: Any) -> None:
        """Read the closure's measured norms (see ``BatchClosure``'s ``measure_*`` options);
        on more than one rank average ``|g_rank|²`` over ranks (one scalar all-reduce)."""
        if closure.global_grad_sq_norm is None:  # the optimizer never called the closure
            return
        if closure.local_grad_sq_norm is not None:
            small = closure.local_grad_sq_norm.detach().to(torch.float64).reshape(1).clone()
            comm.all_reduce(small, op="avg")
        else:
            small = closure.micro_grad_sq_norms.mean()
        self.update(float(small), float(closure.global_grad_sq_norm))

    @property
    def noise_scale(self) -> float | None:
        """B_simple = tr(Σ) / |G|² of the smoothed parts (``None`` before any measurement)."""
        grad_sq, trace = self.grad_sq.value, self.trace.value
        if grad_sq is None or trace is None:
            return None
        return trace / grad_sq if grad_sq != 0 else math.inf

    def record(self) -> dict[str, float]:
        """The metrics of a log record; empty before the first measurement."""
        if self.grad_sq.count == 0:
            return {}
        return {
            "noise_scale": self.noise_scale,
            "noise_scale_grad_sq": self.grad_sq.value,
            "noise_scale_trace": self.trace.value,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "small_batch": self.small_batch,
            "big_batch": self.big_batch,
            "averages": {
                name: {"m": avg.m, "count": avg.count}
                for name, avg in (("grad_sq", self.grad_sq), ("trace", self.trace))
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("grad_sq", "trace"):
            average = getattr(self, name)
            average.m = float(state["averages"][name]["m"])
            average.count = int(state["averages"][name]["count"])
