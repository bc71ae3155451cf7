"""True-Fisher output gradients: targets sampled from the model's predictive distribution.

K-FAC's ``G`` uses ``g = ∂ℓ(ŷ)/∂s`` with ``ŷ ~ p(y | f(x))`` instead of the real targets
(Martens & Grosse 2015, section 5: "the true Fisher"). What the backward pass needs is only
``Δ = ∂ℓ(ŷ)/∂f`` at the outputs ``f`` for one example; :func:`sampled_output_gradient` returns
it directly, scaled so that, per example,

    E_ŷ[Δ Δᵀ] = ∂²ℓ/∂f²          (the loss's Hessian in output space: the Fisher = the GGN)

for the per-example losses of :mod:`secondorder.optim.losses` (``C`` classes, ``D`` output
elements per example, ``P`` positions for cross-entropy over ``(N, C, *positions)``):

- ``cross_entropy``: ``ŷ ~ Categorical(p = softmax(f))`` per position,
  ``Δ = (p − onehot(ŷ)) / √P``; ``E[ΔΔᵀ] = (diag p − p pᵀ) / P`` per position.
- ``mse`` (``ℓ = mean_d (f_d − y_d)²``, a Gaussian NLL with variance ``σ² = D/2`` up to
  constants): ``ŷ = f + √(D/2) ε`` with ``ε ~ N(0, I)``, ``Δ = (2/D)(f − ŷ) = −√(2/D) ε``;
  ``E[ΔΔᵀ] = (2/D) I``.
- ``bernoulli`` (``ℓ = mean_d BCE(f_d, y_d)``, i.e. ``1/D`` times the Bernoulli NLL):
  ``ŷ_d ~ Bernoulli(σ(f_d))``, ``Δ = (σ(f) − ŷ) / √D``; ``E[ΔΔᵀ] = diag(σ(1 − σ)) / D``.
  (The raw sampled gradient of ``ℓ`` would be ``1/D`` too small in covariance; the ``√D``
  keeps ``A ⊗ G`` on the scale of the loss's curvature, as for the other kinds.)

Rank-invariant sampling: the noise is drawn for ``world_size · N`` rows from the optimizer's
generator (the same state on every rank) and rank ``r`` uses rows ``[rN, (r+1)N)``. So every
rank's generator stays identical (a rank-0 checkpoint resumes every rank exactly) and, when the
ranks hold consecutive shards of the global batch, the samples equal a single process's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SAMPLED_LOSS_KINDS", "sampled_output_gradient"]

SAMPLED_LOSS_KINDS: tuple[str, ...] = ("cross_entropy", "mse", "bernoulli")


def sampled_output_gradient(
    kind: str,
    outputs: Tensor,
    *,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """``Δ = ∂ℓ(ŷ)/∂f`` per example for targets ``ŷ`` sampled from the model (float32/64).

    Args:
        kind: the loss kind (one of :data:`SAMPLED_LOSS_KINDS`).
        outputs: model outputs ``f`` of shape ``(N, ...)``.
        generator: the optimizer's generator, on ``outputs``' device.
        rank: this rank; it takes rows ``[rank·N, (rank+1)·N)`` of the drawn noise.
        world_size: number of ranks.

    Returns:
        ``Δ`` with the shape of ``outputs``, in float32 (float64 for float64 outputs), not
        divided by the batch size (the per-example loss's gradient).

    Raises:
        ValueError: for a loss kind that has no sampler.
    """
    dtype = torch.float64 if outputs.dtype == torch.float64 else torch.float32
    f = outputs.detach().to(dtype)
    n = f.shape[0]
    rows = slice(rank * n, (rank + 1) * n)

    def draw(shape: tuple[int, ...], normal: bool = False) -> Tensor:
        full = (world_size * n, *shape[1:])
        fn = torch.randn if normal else torch.rand
        return fn(full, generator=generator, dtype=dtype, device=f.device)[rows]

    if kind == "cross_entropy":
        logits = f.movedim(1, -1)  # (N, *positions, C)
        positions = logits[0, ..., 0].numel()
        p = torch.softmax(logits, dim=-1)
        u = draw(tuple(logits.shape[:-1]))
        # Inverse-CDF sampling: one uniform per (example, position) keeps draws row-aligned.
        classes = (p.cumsum(-1) < u.unsqueeze(-1)).sum(-1).clamp(max=p.shape[-1] - 1)
        # onehot(ŷ) by comparison (F.one_hot validates its input with a host sync on CUDA).
        onehot = classes.unsqueeze(-1) == torch.arange(p.shape[-1], device=p.device)
        delta = p - onehot.to(dtype)
        return (delta / math.sqrt(positions)).movedim(-1, 1)
    if kind == "mse":
        elements = f[0].numel()
        return draw(tuple(f.shape), normal=True) * -math.sqrt(2.0 / elements)
    if kind == "bernoulli":
        elements = f[0].numel()
        p = torch.sigmoid(f)
        sampled = (draw(tuple(f.shape)) < p).to(dtype)
        return (p - sampled) / math.sqrt(elements)
    raise ValueError(
        f"fisher_type='true' cannot sample targets for loss kind {kind!r}; supported: "
        f"{', '.join(SAMPLED_LOSS_KINDS)} (use fisher_type='empirical' for other losses)"
    )
