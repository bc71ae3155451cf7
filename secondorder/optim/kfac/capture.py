"""Factor statistics of one factor-update step, captured by module hooks.

Implements the statistics of Martens & Grosse 2015 (K-FAC, section 3: ``A = E[ā āᵀ]``,
``G = E[g gᵀ]``), Grosse & Martens 2016 (KFC, convolutions) and Ba, Grosse & Martens 2017
(doubly-factored layers). Symbols: ``ā`` layer input with homogeneous coordinate, ``g = ∂ℓ_n/∂s``
gradient of example ``n``'s loss w.r.t. the layer output ``s``, ``N`` examples, ``T`` positions
(output positions of a convolution, middle dimensions of a ``Linear`` input; ``T = 1`` for a
plain ``Linear``).

Conventions (with these, ``A ⊗ G`` of a ``Linear`` layer and one example is exactly that
example's ``vec(∇W̄) vec(∇W̄)ᵀ``, column-major ``vec``):

- ``A = (1/(N T)) Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ``: averaged over examples AND positions.
- ``G = (1/N) Σ_{n,t} g_{n,t} g_{n,t}ᵀ``: averaged over examples, SUMMED over positions. This is
  KFC's ``Ω ⊗ Γ`` (``Ω`` summed, ``Γ`` averaged over positions) with the factor ``T`` moved from
  ``A`` to ``G``; the product ``A ⊗ G`` is the same.
- ``g`` is the per-example gradient, not the ``1/B``-scaled gradient of the mean loss. With
  ``fisher_type="empirical"`` the hooks see ``ĝ = (scale / N_local) g`` (the closure's loss is
  the mean over its ``N_local`` examples, times the float16 loss scale), so the sums are
  multiplied by ``(N_local / scale)²``. With ``fisher_type="true"`` the sampled backward
  (``Δ`` of :mod:`~secondorder.optim.kfac.sampling`) already gives per-example ``g``.

True Fisher without a second forward: on factor steps each covered layer's forward hook keeps
its output ``s`` and hands a clone to the rest of the network (so an in-place activation cannot
rewrite ``s``); the model's own forward hook then samples ``Δ`` at the outputs ``f`` and runs
ONE extra backward, ``autograd.grad(f, [s…], Δ, retain_graph=True)``, which computes only
activation gradients (no parameter gradients, nothing accumulated into ``.grad``) before the
closure's real backward reuses the same graph. Batch norm statistics and dropout masks are thus
those of the closure's own forward.

Doubly-factored layers (Ba et al. 2017): each activation row ``a`` (without the homogeneous
coordinate) viewed as a ``d1 × d2`` matrix ``M`` is replaced by its best rank-one approximation
``M ≈ k ψᵀ`` with ``k = √σ₁ u₁``, ``ψ = √σ₁ v₁`` (leading singular triplet of ``M``, taken from
the eigendecomposition of the smaller Gram matrix), so ``a ≈ k ⊗ ψ`` and, assuming ``k`` and
``ψ`` independent, ``E[a aᵀ] ≈ K ⊗ Ψ`` with ``K = E[k kᵀ]`` (``d1 × d1``), ``Ψ = E[ψ ψᵀ]``
(``d2 × d2``), both averaged over examples and positions. The homogeneous coordinate's block of
``A`` is kept exactly (``E[1·1] = 1``) and its cross terms with ``a`` are dropped:
``A ≈ blockdiag(K ⊗ Ψ, 1)``. No ``dim A × dim A`` matrix is ever formed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from secondorder.optim.kfac.layers import KFACLayer
from secondorder.optim.kfac.sampling import sampled_output_gradient

__all__ = ["FactorCapture", "rank_one_factors"]


class FactorCapture:
    """Context manager installing the factor-statistics hooks for one optimizer step.

    Attributes:
        sums: per layer, unnormalised sums ``Σ ā āᵀ`` (``"A"``) or ``Σ k kᵀ``, ``Σ ψ ψᵀ``
            (``"K"``, ``"Psi"``) and ``Σ g gᵀ`` (``"G"``, per-example scale after
            :meth:`finish`).
        rows: per layer, activation rows seen (examples · positions).
        examples: per layer, examples seen.
        seconds: host time spent inside the hooks.
    """

    def __init__(
        self,
        layers: Sequence[KFACLayer],
        model: nn.Module,
        *,
        fisher_type: str,
        loss_kind: str,
        generator: torch.Generator | None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.layers = list(layers)
        self.model = model
        self.fisher_type = fisher_type
        self.loss_kind = loss_kind
        self.generator = generator
        self.rank, self.world_size = rank, world_size
        self.sums: list[dict[str, Tensor]] = [{} for _ in self.layers]
        self.rows = [0] * len(self.layers)
        self.examples = [0] * len(self.layers)
        self.seconds = 0.0
        self._pending: list[tuple[int, Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> FactorCapture:
        for index, layer in enumerate(self.layers):
            hook = partial(self._forward_hook, index)
            self._handles.append(layer.module.register_forward_hook(hook))
        if self.fisher_type == "true":
            # Registered last: fires after every layer hook, also when the model is a layer.
            self._handles.append(self.model.register_forward_hook(self._sample_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def finish(self, *, grad_scale: float = 1.0) -> None:
        """Complete the sums: ``Σ ā āᵀ`` from ``Σ a aᵀ``, ``Σ a`` and the row count; empirical
        ``G`` sums brought to per-example scale (see the module docstring)."""
        for index, sums in enumerate(self.sums):
            if "A_sum" in sums:
                column = sums.pop("A_sum")
                top = torch.cat([sums["A"], column.unsqueeze(1)], dim=1)
                corner = column.new_full((1,), float(self.rows[index]))
                sums["A"] = torch.cat([top, torch.cat([column, corner]).unsqueeze(0)], dim=0)
            if self.fisher_type == "empirical" and "G" in sums:
                sums["G"].mul_((self.examples[index] / grad_scale) ** 2)

    # -- hooks ----------------------------------------------------------------------------------

    def _forward_hook(self, index: int, module: nn.Module, inputs: Any, output: Tensor) -> Any:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return None  # evaluation forwards
        start = time.perf_counter()
        layer = self.layers[index]
        x = inputs[0].detach()
        with _no_autocast(x):  # statistics in the parameter dtype, also under mixed precision
            rows = layer.activation_rows(x).to(layer.weight.dtype)
            self._add_activation(index, rows)
        self.rows[index] += rows.shape[0]
        self.examples[index] += layer.examples(x)
        result = None
        if self.fisher_type == "true":
            self._pending.append((index, output))
            result = output.clone()
        else:
            # Fires during the closure's backward with ∂loss/∂s (before any in-place change).
            output.register_hook(partial(self._grad_hook, index))
        self.seconds += time.perf_counter() - start
        return result

    def _grad_hook(self, index: int, grad: Tensor) -> None:
        start = time.perf_counter()
        with _no_autocast(grad):
            self._add_gradient(index, grad)
        self.seconds += time.perf_counter() - start

    def _sample_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self._pending or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor):
            raise TypeError(
                "fisher_type='true' needs the model to return one tensor of outputs, got "
                f"{type(output).__name__}; use fisher_type='empirical'"
            )
        start = time.perf_counter()
        assert self.generator is not None
        indices = [index for index, _ in self._pending]
        tensors = [tensor for _, tensor in self._pending]
        self._pending.clear()
        with _no_autocast(output):
            delta = sampled_output_gradient(
                self.loss_kind,
                output,
                generator=self.generator,
                rank=self.rank,
                world_size=self.world_size,
            ).to(output.dtype)
            grads = torch.autograd.grad(
                output, tensors, grad_outputs=delta, retain_graph=True, allow_unused=True
            )
            for index, grad in zip(indices, grads, strict=True):
                if grad is not None:
                    self._add_gradient(index, grad)
        self.seconds += time.perf_counter() - start

    # -- accumulation ---------------------------------------------------------------------------

    def _add_activation(self, index: int, a: Tensor) -> None:
        layer, sums = self.layers[index], self.sums[index]
        if layer.double_shape is not None:
            k, psi = rank_one_factors(a, layer.double_shape)
            _accumulate(sums, "K", k)
            _accumulate(sums, "Psi", psi)
            return
        _accumulate(sums, "A", a)
        if layer.has_bias:  # the homogeneous coordinate ā = [a; 1], assembled in finish()
            if "A_sum" not in sums:
                sums["A_sum"] = a.new_zeros(layer.in_dim)
            sums["A_sum"].add_(a.sum(dim=0))

    def _add_gradient(self, index: int, grad: Tensor) -> None:
        layer = self.layers[index]
        g = layer.output_rows(grad.detach()).to(layer.weight.dtype)
        _accumulate(self.sums[index], "G", g)


def _no_autocast(like: Tensor) -> torch.autocast:
    return torch.autocast(device_type=like.device.type, enabled=False)


def _accumulate(sums: dict[str, Tensor], name: str, rows: Tensor) -> None:
    if name not in sums:
        sums[name] = rows.new_zeros(rows.shape[1], rows.shape[1])
    sums[name].addmm_(rows.T, rows)


def rank_one_factors(a: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per-row best rank-one factors: ``a_r.view(d1, d2) ≈ k_r ψ_rᵀ``, ``k = √σ₁u₁, ψ = √σ₁v₁``.

    Args:
        a: activation rows ``(R, d1 · d2)`` (row-major ``d1 × d2`` matrices).
        shape: ``(d1, d2)``.

    Returns:
        ``k`` of shape ``(R, d1)`` and ``ψ`` of shape ``(R, d2)`` (signs are arbitrary; only
        ``k kᵀ`` and ``ψ ψᵀ`` are used). Zero rows give zero factors.
    """
    d1, d2 = shape
    m = a.reshape(-1, d1, d2)
    transpose = d1 < d2
    if transpose:  # work with the smaller Gram matrix
        m = m.transpose(1, 2)
    gram = m.transpose(1, 2) @ m
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    sigma = eigenvalues[:, -1].clamp(min=0).sqrt()  # σ₁ = √(largest eigenvalue of MᵀM)
    v = eigenvectors[:, :, -1]
    mv = (m @ v.unsqueeze(-1)).squeeze(-1)  # σ₁ u₁
    root = sigma.sqrt().unsqueeze(-1)
    tiny = torch.finfo(a.dtype).tiny
    left = mv / root.clamp(min=tiny)  # √σ₁ u₁ (zero where σ₁ = 0, since then M v = 0)
    right = v * root  # √σ₁ v₁
    return (right, left) if transpose else (left, right)
