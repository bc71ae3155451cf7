"""Damped inverses and eigendecompositions of Kronecker factors, with failure handling.

Factored Tikhonov damping (Martens & Grosse 2015, section 6.3): ``F + λI`` for ``F = A ⊗ G`` is
approximated by ``(A + π√λ I) ⊗ (G + √λ/π I)`` with

    π = √( (tr A / dim A) / (tr G / dim G) )        (the trace-norm choice of π)

so that ``inverse_method="inverse"`` stores ``(A + π√λ I)⁻¹`` and ``(G + √λ/π I)⁻¹``.
``inverse_method="eigen"`` stores ``A = Q_A diag(d_A) Q_Aᵀ`` (and ``G``) undamped; ``λ`` is added
exactly in the Kronecker eigenbasis when preconditioning
(:mod:`~secondorder.optim.kfac.precondition`).

Doubly-factored layers (``A ≈ blockdiag(K ⊗ Ψ, 1)``, Ba, Grosse & Martens 2017) nest the same
rule: ``γ = π√λ`` is ``A``'s share; ``K ⊗ Ψ + γI ≈ (K + π₂√γ I) ⊗ (Ψ + √γ/π₂ I)`` with
``π₂ = √((tr K / d1) / (tr Ψ / d2))``; the bias block becomes ``1 + γ``. ``tr A = tr K · tr Ψ
(+ 1 with a bias)``.

Numerics: every decomposition runs in float64 on the factor's device and is cast back to the
factor's dtype; eigenvalues are clamped at 0. A decomposition that raises or returns non-finite
values is retried with 10× the damping (the factored shift at ``10λ``; for ``eigen`` the factor
``F + shift(10λ) I`` is decomposed, so that factor keeps the extra damping), then once more in
float64 on the CPU. If that also fails, the previous decomposition is kept (identity when there
is none) and the failure is counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from secondorder.optim.kfac.assignment import Assignment
from secondorder.optim.kfac.distributed import broadcast_from_owners
from secondorder.optim.kfac.layers import KFACLayer

__all__ = [
    "damping_shifts",
    "decompose_factors",
    "decomposition_keys",
    "decomposition_shapes",
    "decompositions_missing",
    "drop_others_decompositions",
    "refresh_decompositions",
    "trace_ratio",
]

Method = str  # "eigen" | "inverse"


def trace_ratio(numerator: Tensor, numerator_dim: int, denominator: Tensor, denominator_dim: int):
    """``π = √((tr X / dim X) / (tr Y / dim Y))`` from traces (1 when either trace is ≤ 0)."""
    x = numerator / numerator_dim
    y = denominator / denominator_dim
    ok = (x > 0) & (y > 0) & torch.isfinite(x) & torch.isfinite(y)
    return torch.where(ok, (x / torch.where(ok, y, 1.0)).sqrt(), torch.ones_like(x))


def damping_shifts(
    factors: dict[str, Tensor], *, has_bias: bool, damping: float
) -> dict[str, Tensor]:
    """The factored-Tikhonov diagonal shift of each factor at damping ``λ`` (0-d float64).

    ``A`` side: ``π√λ``; ``G`` side: ``√λ/π``. For a doubly-factored layer (``K``, ``Psi``,
    ``G``): ``K`` gets ``π₂√γ``, ``Ψ`` gets ``√γ/π₂`` with ``γ = π√λ``; the bias block's shift
    ``γ`` is returned under ``"bias"``.
    """
    root = math.sqrt(damping)
    g = factors["G"].to(torch.float64)
    trace_g = g.diagonal().sum()
    if "A" in factors:
        a = factors["A"].to(torch.float64)
        pi = trace_ratio(a.diagonal().sum(), a.shape[0], trace_g, g.shape[0])
        return {"A": pi * root, "G": root / pi}
    k = factors["K"].to(torch.float64)
    psi = factors["Psi"].to(torch.float64)
    trace_k, trace_psi = k.diagonal().sum(), psi.diagonal().sum()
    extra = 1 if has_bias else 0
    trace_a = trace_k * trace_psi + extra
    pi = trace_ratio(trace_a, k.shape[0] * psi.shape[0] + extra, trace_g, g.shape[0])
    gamma = pi * root
    pi2 = trace_ratio(trace_k, k.shape[0], trace_psi, psi.shape[0])
    return {"K": pi2 * gamma.sqrt(), "Psi": gamma.sqrt() / pi2, "G": root / pi, "bias": gamma}


def decompose_factors(
    factors: Sequence[Tensor],
    shifts: Sequence[Tensor],
    retry_shifts: Sequence[Tensor],
    previous: Sequence[tuple[Tensor, ...] | None],
    *,
    method: Method,
) -> tuple[list[tuple[Tensor, ...]], int, int]:
    """Decompose many factors: first all on their device, then one finiteness check, then
    retries only for the failures.

    Args:
        factors: the factors ``F``.
        shifts: their damping shifts at ``λ`` (used by ``inverse``; ``eigen`` decomposes ``F``).
        retry_shifts: their shifts at ``10λ``, for retries (both methods).
        previous: the decomposition to keep if every retry fails (``None``: identity).
        method: ``"eigen"`` → ``(Q, d)`` per factor; ``"inverse"`` → ``((F + shift I)⁻¹,)``.

    Returns:
        The decompositions in each factor's dtype, the number of retries and of failures.
    """
    first = [
        _attempt(f, method, s if method == "inverse" else None, f.device)
        for f, s in zip(factors, shifts, strict=True)
    ]
    checks = [torch.isfinite(t).all() for result in first if result is not None for t in result]
    finite = iter(torch.stack(checks).tolist() if checks else [])  # one host sync for all
    results: list[tuple[Tensor, ...]] = []
    retries = failures = 0
    for index, result in enumerate(first):
        factor = factors[index]
        if result is not None and all([next(finite) for _ in result]):
            results.append(tuple(t.to(factor.dtype) for t in result))
            continue
        for device in (factor.device, torch.device("cpu")):
            retries += 1
            result = _attempt(factor, method, retry_shifts[index], device)
            if result is not None and all(bool(torch.isfinite(t).all()) for t in result):
                results.append(
                    tuple(t.to(device=factor.device, dtype=factor.dtype) for t in result)
                )
                break
        else:
            failures += 1
            kept = previous[index]
            results.append(kept if kept is not None else _identity(factor, method))
    return results, retries, failures


def _identity(factor: Tensor, method: Method) -> tuple[Tensor, ...]:
    n = factor.shape[0]
    eye = torch.eye(n, dtype=factor.dtype, device=factor.device)
    if method == "eigen":
        return eye, torch.ones(n, dtype=factor.dtype, device=factor.device)
    return (eye,)


def _attempt(
    factor: Tensor, method: Method, shift: Tensor | None, device: torch.device
) -> tuple[Tensor, ...] | None:
    matrix = factor.to(device=device, dtype=torch.float64)
    if shift is not None:
        matrix = matrix + torch.diag_embed(shift.to(device).expand(matrix.shape[0]))
    try:
        if method == "eigen":
            eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
            # Row-major like a received broadcast, so owner and receivers round alike.
            return eigenvectors.contiguous(), eigenvalues.clamp(min=0)
        return (torch.linalg.inv(matrix).contiguous(),)
    except (torch.linalg.LinAlgError, RuntimeError):
        return None


def decomposition_keys(name: str, method: Method) -> list[str]:
    """State keys of factor ``name``'s decomposition: ``Q_A``, ``d_A`` or ``A_inv``."""
    return [f"Q_{name}", f"d_{name}"] if method == "eigen" else [f"{name}_inv"]


def decomposition_shapes(n: int, method: Method) -> list[torch.Size]:
    """The shapes of a ``n × n`` factor's decomposition, in :func:`decomposition_keys` order."""
    return [torch.Size([n, n]), torch.Size([n])][: 2 if method == "eigen" else 1]


def decompositions_missing(
    layers: Sequence[KFACLayer],
    state: MutableMapping[Tensor, dict[str, Any]],
    assignment: Assignment,
    *,
    rank: int,
    method: Method,
) -> bool:
    """Whether a layer this rank preconditions has factors but no decomposition yet."""
    for index, layer in enumerate(layers):
        layer_state = state[layer.weight]
        if not assignment.preconditions(index, rank) or "G" not in layer_state:
            continue
        for name in layer.factor_dims():
            if any(key not in layer_state for key in decomposition_keys(name, method)):
                return True
    return False


def drop_others_decompositions(
    layers: Sequence[KFACLayer],
    state: MutableMapping[Tensor, dict[str, Any]],
    assignment: Assignment,
    *,
    rank: int,
) -> None:
    """Per-layer ownership: forget the decompositions of the layers other ranks precondition
    (a loaded checkpoint holds those of the rank that wrote it); this rank's own are then
    missing and recomputed."""
    for index, layer in enumerate(layers):
        if not assignment.preconditions(index, rank):
            layer_state = state[layer.weight]
            stale = [k for k in layer_state if k.startswith(("Q_", "d_")) or k.endswith("_inv")]
            for key in stale:
                del layer_state[key]


def _layer_shifts(
    layers: Sequence[KFACLayer],
    state: MutableMapping[Tensor, dict[str, Any]],
    indices: Iterable[int],
    *,
    method: Method,
    damping: float,
) -> tuple[dict[int, dict[str, Tensor]], dict[int, dict[str, Tensor]]]:
    """The damping shifts of layers ``indices`` at ``λ`` and at ``10λ`` (for retries); for a
    doubly-factored layer with a bias (``inverse``) also its bias block in the state."""
    shifts, retry_shifts = {}, {}
    for i in indices:
        layer, layer_state = layers[i], state[layers[i].weight]
        factors = {name: layer_state[name] for name in layer.factor_dims()}
        shifts[i] = damping_shifts(factors, has_bias=layer.has_bias, damping=damping)
        retry_shifts[i] = damping_shifts(factors, has_bias=layer.has_bias, damping=10 * damping)
        if layer.double_shape is not None and layer.has_bias and method == "inverse":
            # The bias block of blockdiag(K ⊗ Ψ, 1) + γI, inverted: 1 / (1 + γ).
            layer_state["bias_inv"] = (1.0 / (1.0 + shifts[i]["bias"])).to(layer.weight.dtype)
    return shifts, retry_shifts


def refresh_decompositions(
    layers: Sequence[KFACLayer],
    state: MutableMapping[Tensor, dict[str, Any]],
    assignment: Assignment,
    *,
    rank: int,
    comm: Any,
    method: Method,
    damping: float,
) -> tuple[int, int]:
    """Decompose the factors this rank owns and share them (Ba et al. 2017, section 3).

    With a per-factor assignment (``layer_owner is None``) each result is broadcast from its
    owner so every rank holds every decomposition; with a per-layer assignment only the owner
    keeps them (it alone preconditions that layer).

    Returns:
        This rank's retries and failures (see :func:`decompose_factors`).
    """
    world = 1 if comm is None else comm.world_size
    items = [
        (i, name)
        for i, layer in enumerate(layers)
        if "G" in state[layer.weight] and assignment.preconditions(i, rank)
        for name in layer.factor_dims()
    ]
    if not items:
        return 0, 0
    owners = [assignment.factor_owner[item] for item in items]
    mine = [j for j, owner in enumerate(owners) if owner == rank]
    shifts, retry_shifts = _layer_shifts(
        layers, state, {i for i, _ in items}, method=method, damping=damping
    )
    previous = []
    for j in mine:
        layer_state = state[layers[items[j][0]].weight]
        kept = [layer_state.get(key) for key in decomposition_keys(items[j][1], method)]
        previous.append(None if any(t is None for t in kept) else tuple(kept))
    results, retries, failures = decompose_factors(
        [state[layers[items[j][0]].weight][items[j][1]] for j in mine],
        [shifts[items[j][0]][items[j][1]] for j in mine],
        [retry_shifts[items[j][0]][items[j][1]] for j in mine],
        previous,
        method=method,
    )
    local = dict(zip(mine, results, strict=True))
    if assignment.layer_owner is not None:  # per-layer ownership: nothing to share
        received = [list(local[j]) for j in range(len(items))]
    else:
        shapes = [decomposition_shapes(layers[i].factor_dims()[name], method) for i, name in items]
        weight = layers[0].weight
        received = broadcast_from_owners(
            comm, owners, local, shapes, dtype=weight.dtype, device=weight.device
        )
    for (i, name), tensors in zip(items, received, strict=True):
        layer_state = state[layers[i].weight]
        for key, tensor in zip(decomposition_keys(name, method), tensors, strict=True):
            # Received tensors are views into one buffer: copy, so checkpoints stay small.
            layer_state[key] = tensor if world == 1 else tensor.clone()
    return retries, failures
