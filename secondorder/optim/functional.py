"""Curvature as pure functions of the parameters, rebuilt per call.

The network and its loss as functions of ``θ`` (``z = f(θ, x)`` called functionally, ``L(z, y)``
as :func:`~secondorder.optim.losses.loss_value` reduces it), their output-space derivatives
(the closed-form ``H_L = ∂²L/∂z²``, ``∂L/∂z``, forward-mode ``J v``), the fused GGN pass, and the
pure curvature-vector products built from them. :mod:`secondorder.optim.curvature` explains the
products and caches them per step in :class:`~secondorder.optim.curvature.CurvatureOperator`.

Symbols: ``θ`` parameters, ``v`` a vector shaped like ``θ``, ``z`` the outputs of ``N`` examples,
``L`` the batch loss, ``J = ∂z/∂θ``, ``G = Jᵀ H_L J``, ``p = softmax(z)``, ``σ = sigmoid(z)``.

Forwards never touch batch-norm running statistics (train-mode batch statistics are still
used), except the fused pass when asked: there it is the step's training forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, get_args

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap

from secondorder.optim.closure import frozen_norm_statistics
from secondorder.optim.flat import Params, flatten
from secondorder.optim.losses import LossKind, loss_value

Batch = tuple[Tensor, Tensor]
"""``(inputs, targets)``."""
CurvatureKind = Literal["hessian", "ggn", "fisher", "empirical_fisher"]
CURVATURE_KINDS: tuple[str, ...] = get_args(CurvatureKind)
HvpMode = Literal["reverse_over_reverse", "forward_over_reverse"]
HVP_MODES: tuple[str, ...] = get_args(HvpMode)
DEFAULT_HVP_MODE: HvpMode = "reverse_over_reverse"


def model_outputs(model: nn.Module, params: Params, inputs: Tensor) -> Tensor:
    """``z = f(θ, x)``: the model called functionally at ``params`` (others at their values)."""
    with frozen_norm_statistics(model):
        return functional_call(model, dict(params), (inputs,), strict=False)


def batch_loss(loss_kind: LossKind, outputs: Tensor, targets: Tensor) -> Tensor:
    """``L(z, y)`` of :func:`~secondorder.optim.losses.loss_value`, in float32 or float64."""
    if outputs.dtype not in (torch.float32, torch.float64):
        outputs = outputs.float()
    return loss_value(loss_kind, outputs, targets)


def forward_function(model: nn.Module, inputs: Tensor) -> Callable[[Params], Tensor]:
    """``θ ↦ f(θ, x)`` for one batch of inputs."""
    return lambda params: model_outputs(model, params, inputs)


def loss_function(
    model: nn.Module, batch: Batch, loss_kind: LossKind
) -> Callable[[Params], Tensor]:
    """``θ ↦ L(f(θ, x), y)`` for one batch."""
    inputs, targets = batch
    return lambda params: batch_loss(loss_kind, model_outputs(model, params, inputs), targets)


def loss_and_gradient(
    model: nn.Module, params: Params, batch: Batch, loss_kind: LossKind
) -> tuple[Tensor, Params]:
    """``(L, ∇_θ L)`` on one batch, detached, without touching ``.grad``."""
    g, loss = grad_and_value(loss_function(model, batch, loss_kind))(params)
    return loss.detach(), g


def output_hessian(loss_kind: LossKind, outputs: Tensor) -> Callable[[Tensor], Tensor]:
    """``u ↦ H_L u`` with ``H_L = ∂²L/∂z²`` in closed form, matching ``loss_value``'s reduction.

    ``M`` is the number of terms ``L`` averages over: ``N`` times any spatial positions for
    cross-entropy (classes on dim 1), every output element for ``mse``/``bernoulli``.

    - ``cross_entropy``: ``(1/M)(p ⊙ u − p (pᵀu))`` per position, i.e. ``diag(p) − ppᵀ``.
    - ``mse``: ``(2/M) u``, since ``L = mean((z − y)²)``.
    - ``bernoulli``: ``(1/M) σ(1 − σ) ⊙ u``.

    None depends on the targets; each is positive semi-definite, hence so is ``G``.
    """
    z = outputs.detach()
    if loss_kind == "cross_entropy":
        p, m = torch.softmax(z, dim=1), z.numel() // z.shape[1]
        return lambda u: (p * u - p * (p * u).sum(dim=1, keepdim=True)) / m
    if loss_kind == "mse":
        return lambda u: u * (2.0 / z.numel())
    if loss_kind == "bernoulli":
        s = torch.sigmoid(z)
        w = s * (1.0 - s) / z.numel()
        return lambda u: w * u
    raise ValueError(f"Unknown loss kind {loss_kind!r}")


def output_gradient(loss_kind: LossKind, outputs: Tensor, targets: Tensor) -> Tensor:
    """``∂L/∂z`` at the observed targets."""
    return grad(lambda z: batch_loss(loss_kind, z, targets))(outputs.detach())


def empirical_fisher_cotangent(output_gradient: Tensor, jv: Tensor) -> Tensor:
    """The output cotangent ``e_n (e_nᵀ (J v)_n) / N`` of ``F̂ v = Jᵀ[...]``.

    ``g_n = J_nᵀ e_n`` with ``e_n = ∂ℓ_n/∂z_n = N ∂L/∂z_n``, so no per-example gradient is formed.
    """
    n = output_gradient.shape[0]
    e = output_gradient * n
    s = (e * jv).flatten(1).sum(1)
    return e * s.view(-1, *([1] * (e.dim() - 1))) / n


def forward_jvp(model: nn.Module, params: Params, vector: Params, inputs: Tensor) -> Tensor:
    """``J v`` by forward-mode dual numbers (no graph; batch-norm statistics untouched).

    ``torch.autograd.forward_ad`` rather than ``torch.func.jvp``: the same arithmetic as the
    fused pass's dual forward (``torch.func`` decomposes batch norm differently, so its ``J v``
    differs in the last bits).
    """
    with fwAD.dual_level():
        dual = {name: fwAD.make_dual(p, vector[name]) for name, p in params.items()}
        outputs, tangent = fwAD.unpack_dual(model_outputs(model, dual, inputs))
    return torch.zeros_like(outputs) if tangent is None else tangent


class OutputTerms(NamedTuple):
    """One micro-batch's output-space pieces of the fused pass along ``t``."""

    loss: Tensor  # L
    jt: Tensor  # J t
    hjt: Tensor  # H_L J t
    output_gradient: Tensor  # e = ∂L/∂z
    output_hessian: Callable[[Tensor], Tensor]  # u ↦ H_L u


def fused_ggn_pass(
    model: nn.Module,
    params: Params,
    tangent: Params,
    batch: Batch,
    loss_kind: LossKind,
    *,
    update_norm_statistics: bool,
) -> tuple[OutputTerms, list[Tensor]]:
    """``G t + ∇L`` on one batch in one forward and one backward (Schraudolph 2002, Sec. 3).

    The forward carries ``J t`` as dual numbers next to ``z``; the backward pulls the cotangent
    ``H_L J t + ∂L/∂z`` through ``Jᵀ``, giving ``Jᵀ H_L J t + Jᵀ ∂L/∂z = G t + ∇L`` with no
    separate gradient pass. ``torch.func.vjp`` plus ``jvp`` would run the primal forward twice.

    Args:
        update_norm_statistics: the forward updates batch-norm running statistics, as the
            training forward it replaces would.

    Returns:
        The output-space terms and ``G t + ∇L`` per parameter (in ``params`` order).
    """
    inputs, targets = batch
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    with torch.enable_grad():
        with fwAD.dual_level():
            dual = {name: fwAD.make_dual(leaf, tangent[name]) for name, leaf in leaves.items()}
            if update_norm_statistics:
                outputs = functional_call(model, dual, (inputs,), strict=False)
            else:
                outputs = model_outputs(model, dual, inputs)
            outputs, jt = fwAD.unpack_dual(outputs)
        jt = torch.zeros_like(outputs) if jt is None else jt.detach()
        detached = outputs.detach()
        e, loss = grad_and_value(lambda z: batch_loss(loss_kind, z, targets))(detached)
        h_l = output_hessian(loss_kind, detached)
        hjt = h_l(jt)
        grads = torch.autograd.grad(
            outputs, list(leaves.values()), hjt + e, allow_unused=True, materialize_grads=True
        )
    return OutputTerms(loss.detach(), jt, hjt, e, h_l), list(grads)


# -- pure products ---------------------------------------------------------------------------------


def hessian_vector_product(
    model: nn.Module,
    params: Params,
    batch: Batch,
    loss_kind: LossKind,
    vector: Params,
    *,
    mode: HvpMode = DEFAULT_HVP_MODE,
) -> Params:
    """``H v = ∇_θ (∇_θ L · v)`` on one batch (Pearlmutter 1994).

    ``mode``: ``reverse_over_reverse`` (``vjp`` of the gradient, i.e. double backward) or
    ``forward_over_reverse`` (``jvp`` of the gradient).
    """
    loss = loss_function(model, batch, loss_kind)
    if mode == "forward_over_reverse":
        return jvp(grad(loss), (params,), (vector,))[1]
    if mode == "reverse_over_reverse":
        return vjp(grad(loss), params)[1](vector)[0]
    raise ValueError(f"Invalid hvp_mode: {mode!r}; choose one of {', '.join(HVP_MODES)}")


def ggn_vector_product(
    model: nn.Module, params: Params, batch: Batch, loss_kind: LossKind, vector: Params
) -> Params:
    """``G v = Jᵀ H_L J v`` on one batch (Schraudolph 2002): ``jvp``, closed-form ``H_L``, vjp."""
    f = forward_function(model, batch[0])
    outputs, vjp_fn = vjp(f, params)
    return vjp_fn(output_hessian(loss_kind, outputs)(jvp(f, (params,), (vector,))[1]))[0]


def fisher_vector_product(
    model: nn.Module, params: Params, batch: Batch, loss_kind: LossKind, vector: Params
) -> Params:
    """``F v``, equal to ``G v`` for these canonical losses (module docstring)."""
    return ggn_vector_product(model, params, batch, loss_kind, vector)


def empirical_fisher_vector_product(
    model: nn.Module, params: Params, batch: Batch, loss_kind: LossKind, vector: Params
) -> Params:
    """``F̂ v = (1/N) Σ_n g_n (g_nᵀ v)`` at the observed targets: one ``jvp`` and one ``vjp``."""
    f = forward_function(model, batch[0])
    outputs, vjp_fn = vjp(f, params)
    dz = output_gradient(loss_kind, outputs, batch[1])
    return vjp_fn(empirical_fisher_cotangent(dz, jvp(f, (params,), (vector,))[1]))[0]


def empirical_fisher_diagonal(
    model: nn.Module,
    params: Params,
    batches: Sequence[Batch],
    loss_kind: LossKind,
    *,
    chunk_size: int = 64,
) -> Tensor:
    """``(1/N) Σ_n g_n ⊙ g_n`` over the curvature batch, flat (for Martens' preconditioner).

    Per-example gradients come from ``vmap(grad)`` in chunks of ``chunk_size`` examples. With
    train-mode batch norm the examples interact through batch statistics, so per-example
    gradients do not exist; there the batch-gradient approximation ``mean_b ḡ_b ⊙ ḡ_b`` (squared
    micro-batch gradients) is used instead — an underestimate of the noise part, documented.
    """
    has_batch_norm = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )
    total = None
    for inputs, targets in batches:
        if has_batch_norm:
            square = flatten(loss_and_gradient(model, params, (inputs, targets), loss_kind)[1]) ** 2
        else:

            def example_loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
                z = model_outputs(model, p, x.unsqueeze(0))
                return batch_loss(loss_kind, z, y.unsqueeze(0))

            per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
            grads = per_example(params, inputs, targets)
            square = torch.cat([g.pow(2).mean(0).reshape(-1) for g in grads.values()])
        total = square if total is None else total + square
    return total / len(batches)


def vector_product(
    curvature: CurvatureKind,
    model: nn.Module,
    params: Params,
    batch: Batch,
    loss_kind: LossKind,
    vector: Params,
    *,
    hvp_mode: HvpMode = DEFAULT_HVP_MODE,
) -> Params:
    """``C v`` on one batch for the named curvature, rebuilt per call."""
    if curvature == "hessian":
        return hessian_vector_product(model, params, batch, loss_kind, vector, mode=hvp_mode)
    if curvature == "empirical_fisher":
        return empirical_fisher_vector_product(model, params, batch, loss_kind, vector)
    if curvature == "fisher":
        return fisher_vector_product(model, params, batch, loss_kind, vector)
    return ggn_vector_product(model, params, batch, loss_kind, vector)
