"""Applying the Kronecker-factored preconditioner (step 6), and its curvature quadratic form.

Layers of equal shapes are served together (:func:`stack_layer_groups`,
:func:`precondition_stacked`: batched matmuls), so a ResNet's many identical convolutions cost
a few kernels, not a few per layer. Parameters outside K-FAC layers get
:func:`precondition_others` (the gradient, or a diagonal Adam preconditioner).

Vec convention: ``vec`` stacks COLUMNS (column-major), as in Martens & Grosse 2015, so for the
gradient matrix ``∇W̄`` (``dim G × dim A``, bias as last column)

    (A ⊗ G) vec(X) = vec(G X A)      (``torch.kron(A, G) @ X.T.reshape(-1)`` in torch terms)

- ``inverse``: ``V = (G + √λ/π I)⁻¹ ∇W̄ (A + π√λ I)⁻¹`` (Martens & Grosse 2015, section 6.3).
- ``eigen``: with ``A = Q_A diag(d_A) Q_Aᵀ`` and ``G = Q_G diag(d_G) Q_Gᵀ``,
  ``V = Q_G [(Q_Gᵀ ∇W̄ Q_A) / (d_G d_Aᵀ + λ)] Q_Aᵀ`` = ``(A ⊗ G + λI)⁻¹ vec(∇W̄)`` exactly.
- Doubly-factored (Ba, Grosse & Martens 2017), ``A ≈ blockdiag(K ⊗ Ψ, 1)``: the weight
  gradient is viewed as ``(dim G, d1, d2)`` and each factor acts on its own axis, so no
  ``dim A × dim A`` matrix exists: ``eigen`` divides by ``d_G ⊗ d_K ⊗ d_Ψ + λ`` in the
  joint eigenbasis; ``inverse`` applies ``G⁻¹``, ``K⁻¹``, ``Ψ⁻¹`` of the nested factored damping
  (see :mod:`~secondorder.optim.kfac.inverse`). The bias column sees ``G`` alone
  (``(d_G + λ)`` in the eigenbasis, or ``G⁻¹ / (1 + γ)``).

Symbols: ``λ`` damping, ``π`` damping split, ``Q``/``d`` eigenvectors/eigenvalues, ``V`` the
preconditioned gradient.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from secondorder.optim.kfac.assignment import Assignment
from secondorder.optim.kfac.distributed import broadcast_from_owners
from secondorder.optim.kfac.inverse import decomposition_keys
from secondorder.optim.kfac.layers import KFACLayer
from secondorder.optim.kfac.update import Chunk

__all__ = [
    "ADAM_BETA2",
    "ADAM_EPS",
    "curvature",
    "diagonal_adam",
    "precondition",
    "precondition_groups",
    "precondition_layers",
    "precondition_others",
    "precondition_stacked",
    "stack_layer_groups",
]

ADAM_BETA2, ADAM_EPS = 0.999, 1e-8


def precondition(
    layer: KFACLayer,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    state: dict[str, Tensor],
    *,
    method: str,
    damping: float,
) -> tuple[Tensor, Tensor | None]:
    """``V`` for one layer, returned in the weight's (and bias's) shape."""
    if layer.double_shape is not None:
        return _precondition_doubly(layer, grad_weight, grad_bias, state, method, damping)
    grad = layer.gradient_matrix(grad_weight, grad_bias)
    keys = ("Q_A", "d_A", "Q_G", "d_G") if method == "eigen" else ("A_inv", "G_inv")
    one = {key: state[key].unsqueeze(0) for key in keys}
    return layer.split_matrix(
        precondition_stacked(grad[None], one, method=method, damping=damping)[0]
    )


def precondition_stacked(
    grad: Tensor, stacked: dict[str, Tensor], *, method: str, damping: float
) -> Tensor:
    """``V`` for ``L`` layers of equal shapes at once: ``grad`` is ``(L, dim G, dim A)`` and
    ``stacked`` holds the layers' decompositions stacked along a leading axis."""
    if method == "eigen":
        q_a, d_a, q_g, d_g = stacked["Q_A"], stacked["d_A"], stacked["Q_G"], stacked["d_G"]
        rotated = q_g.transpose(1, 2) @ grad @ q_a
        rotated = rotated / (d_g[:, :, None] * d_a[:, None, :] + damping)
        return q_g @ rotated @ q_a.transpose(1, 2)
    return stacked["G_inv"] @ grad @ stacked["A_inv"]


def _precondition_doubly(
    layer: KFACLayer,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    state: dict[str, Tensor],
    method: str,
    damping: float,
) -> tuple[Tensor, Tensor | None]:
    d1, d2 = layer.double_shape  # type: ignore[misc]
    out = layer.out_dim
    grad = grad_weight.reshape(out, d1 * d2)
    if grad_bias is None and layer.has_bias:
        grad_bias = grad.new_zeros(out)
    bias_result = None
    if method == "eigen":
        q_k, d_k, q_psi, d_psi = state["Q_K"], state["d_K"], state["Q_Psi"], state["d_Psi"]
        q_g, d_g = state["Q_G"], state["d_G"]
        t = (q_g.T @ grad).reshape(out, d1, d2)
        t = q_k.T @ t @ q_psi  # rotate the K axis and the Ψ axis
        t = t / (d_g[:, None, None] * d_k[None, :, None] * d_psi[None, None, :] + damping)
        t = (q_k @ t @ q_psi.T).reshape(out, d1 * d2)
        result = q_g @ t
        if layer.has_bias:
            bias_result = q_g @ ((q_g.T @ grad_bias) / (d_g + damping))
    else:
        g_inv = state["G_inv"]
        t = (g_inv @ grad).reshape(out, d1, d2)
        result = (state["K_inv"] @ t @ state["Psi_inv"]).reshape(out, d1 * d2)
        if layer.has_bias:
            bias_result = (g_inv @ grad_bias) * state["bias_inv"]
    weight_result = result.reshape(layer.weight.shape)
    if bias_result is not None:
        bias_result = bias_result.reshape(layer.bias.shape)  # type: ignore[union-attr]
    return weight_result, bias_result


def curvature(
    layer: KFACLayer, delta_weight: Tensor, delta_bias: Tensor | None, state: dict[str, Tensor]
) -> Tensor:
    """``δᵀ F̂ δ`` for the layer's undamped K-FAC approximation ``F̂ = A ⊗ G``: ``⟨Δ, G Δ A⟩``."""
    g = state["G"]
    if layer.double_shape is None:
        delta = layer.gradient_matrix(delta_weight, delta_bias)
        return (delta * (g @ delta @ state["A"])).sum()
    d1, d2 = layer.double_shape
    delta = delta_weight.reshape(layer.out_dim, d1 * d2)
    t = (g @ delta).reshape(layer.out_dim, d1, d2)
    t = state["K"] @ t @ state["Psi"]
    total = (delta.reshape(layer.out_dim, d1, d2) * t).sum()
    if layer.has_bias and delta_bias is not None:
        b = delta_bias.reshape(-1)
        total = total + b @ (g @ b)
    return total


def diagonal_adam(grad: Tensor, state: dict[str, Any], *, step: int) -> Tensor:
    """``∇ / (√v̂ + ε)`` with ``v ← β₂ v + (1 − β₂) ∇²`` and ``v̂ = v / (1 − β₂^step)`` (Adam's
    second moment, Kingma & Ba 2015; ``β₂ = 0.999``, ``ε = 1e-8``): the ``"adam"`` option for
    parameters outside K-FAC layers. A non-finite ``∇²`` leaves ``v`` unchanged (no sync).
    """
    if "exp_avg_sq" not in state:
        state["exp_avg_sq"] = torch.zeros_like(grad)
    v = state["exp_avg_sq"]
    v_new = v * ADAM_BETA2 + grad * grad * (1 - ADAM_BETA2)
    direction = grad / ((v_new / (1 - ADAM_BETA2**step)).sqrt() + ADAM_EPS)
    v.copy_(torch.where(torch.isfinite(v_new).all(), v_new, v))
    return direction


def stack_layer_groups(
    layers: Sequence[KFACLayer],
    state: MutableMapping[Tensor, dict[str, Any]],
    indices: Sequence[int],
    method: str,
) -> list[tuple[list[int], dict[str, Tensor]]]:
    """Group the ready (decomposed, not doubly-factored) layers among ``indices`` by shape and
    stack each group's decompositions; the state then holds views of the stacks, so memory is
    not doubled. :func:`precondition_stacked` then serves a whole group with a few kernels."""
    keys = [key for name in ("A", "G") for key in decomposition_keys(name, method)]
    by_shape: dict[tuple, list[int]] = {}
    for i in indices:
        layer = layers[i]
        if layer.double_shape is None and keys[0] in state[layer.weight]:
            shape = (layer.out_dim, layer.a_dim, layer.has_bias, layer.weight.dtype)
            by_shape.setdefault(shape, []).append(i)
    groups = []
    for members in by_shape.values():
        states = [state[layers[i].weight] for i in members]
        stacked = {key: torch.stack([s[key] for s in states]) for key in keys}
        for j, layer_state in enumerate(states):
            layer_state.update({key: stacked[key][j] for key in keys})
        groups.append((members, stacked))
    return groups


def precondition_groups(
    layers: Sequence[KFACLayer],
    groups: Sequence[tuple[list[int], dict[str, Tensor]]],
    grads: dict[int, Tensor],
    *,
    method: str,
    damping: float,
) -> tuple[list[Chunk], set[int]]:
    """``V`` for whole groups of equal-shape layers (:func:`stack_layer_groups`), one batched
    solve each; returns the chunks and the layers served (a group with a missing gradient is
    left to :func:`precondition_layers`)."""
    chunks: list[Chunk] = []
    done: set[int] = set()
    for members, stacked in groups:
        group = [layers[i] for i in members]
        params = [p for layer in group for p in (layer.weight, layer.bias) if p is not None]
        if any(id(p) not in grads for p in params):
            continue
        gw = torch.stack([grads[id(layer.weight)] for layer in group])
        gw = gw.reshape(len(group), group[0].out_dim, group[0].in_dim)
        grad = gw
        if group[0].has_bias:
            gb = torch.stack([grads[id(layer.bias)] for layer in group])
            grad = torch.cat([gw, gb.unsqueeze(2)], dim=2)
        result = precondition_stacked(grad, stacked, method=method, damping=damping)
        in_dim = group[0].in_dim
        weights = [layer.weight for layer in group]
        chunks.append(Chunk(weights, result[:, :, :in_dim].reshape(-1), gw.reshape(-1)))
        if group[0].has_bias:
            biases = [layer.bias for layer in group]
            chunks.append(Chunk(biases, result[:, :, in_dim].reshape(-1), gb.reshape(-1)))
        done.update(members)
    return chunks, done


def precondition_layers(
    layers: Sequence[KFACLayer],
    state: MutableMapping[Tensor, dict[str, Any]],
    grads: dict[int, Tensor],
    indices: Sequence[int],
    *,
    assignment: Assignment,
    rank: int,
    comm: Any,
    method: str,
    damping: float,
) -> list[Chunk]:
    """``V`` for the layers ``indices``, one by one: each rank computes the layers it
    preconditions; with per-layer ownership the results are broadcast from their owners. A
    layer without decompositions yet (not run at a factor step) gets the plain gradient."""
    local: dict[int, list[Tensor]] = {}
    for j, i in enumerate(indices):
        if not assignment.preconditions(i, rank):
            continue
        layer, layer_state = layers[i], state[layers[i].weight]
        gw = grads[id(layer.weight)]
        gb = grads.get(id(layer.bias)) if layer.bias is not None else None
        if ("Q_G" if method == "eigen" else "G_inv") in layer_state:
            vw, vb = precondition(layer, gw, gb, layer_state, method=method, damping=damping)
        else:
            vw = gw
            vb = gb if gb is not None or layer.bias is None else torch.zeros_like(layer.bias)
        local[j] = [vw] if vb is None else [vw, vb]
    if assignment.layer_owner is not None and indices:
        shapes = [
            [p.shape for p in (layers[i].weight, layers[i].bias) if p is not None] for i in indices
        ]
        w = layers[indices[0]].weight
        owners = [assignment.layer_owner[i] for i in indices]
        received = broadcast_from_owners(
            comm, owners, local, shapes, dtype=w.dtype, device=w.device
        )
        local = dict(enumerate(received))
    chunks = []
    for j, i in enumerate(indices):
        layer = layers[i]
        for p, v in zip((layer.weight, layer.bias), local[j], strict=False):
            if p is not None and id(p) in grads:
                chunks.append(Chunk([p], v.reshape(-1), grads[id(p)].reshape(-1)))
    return chunks


def precondition_others(
    param_groups: Sequence[dict[str, Any]],
    state: MutableMapping[Tensor, dict[str, Any]],
    grads: dict[int, Tensor],
    *,
    covered: set[int],
    method: str,
    step: int,
) -> list[Chunk]:
    """``V`` for the parameters outside K-FAC layers (``other_preconditioner``): the gradient
    itself (``"none"``, one chunk per group, dtype and device) or :func:`diagonal_adam`."""
    chunks = []
    for group in param_groups:
        params = [p for p in group["params"] if id(p) not in covered and id(p) in grads]
        if method == "adam":
            for p in params:
                g = grads[id(p)]
                chunks.append(
                    Chunk([p], diagonal_adam(g, state[p], step=step).reshape(-1), g.reshape(-1))
                )
            continue
        kinds: dict[tuple, list[Tensor]] = {}
        for p in params:
            kinds.setdefault((p.dtype, p.device), []).append(p)
        for members in kinds.values():
            pieces = [grads[id(p)] for p in members]
            flat = torch.cat([g if g.dim() == 1 else g.reshape(-1) for g in pieces])
            chunks.append(Chunk(members, flat, flat))
    return chunks
