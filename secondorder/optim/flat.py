"""Parameter vectors and their flat form: the conversions every curvature method needs, once.

A vector shaped like the parameters comes in three forms, each where it is cheapest:

- a :data:`Params` dict ``{name: tensor}`` in ``model.named_parameters()`` order, what
  ``torch.func`` calls take (:func:`params_by_name`);
- a list of tensors in the same order, what per-parameter state and ``torch._foreach_*`` take;
- one 1-D tensor, what CG, dense solves and collectives take (:func:`flatten`).

The order is always the model's, restricted to the optimised parameters, so the three forms of
one vector line up element for element. :func:`unflatten` and :func:`split_like` return views.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "Params",
    "dot",
    "flat_gradient",
    "flatten",
    "named_parameters_of",
    "params_by_name",
    "set_flat",
    "single_group_parameters",
    "split_like",
    "unflatten",
]

Params = dict[str, Tensor]
"""A parameter-shaped vector ``{name: tensor}`` in ``model.named_parameters()`` order."""

Vector = Mapping[str, Tensor] | Sequence[Tensor]


def named_parameters_of(
    model: nn.Module, params: Iterable[Tensor] | None = None
) -> dict[str, nn.Parameter]:
    """The optimised parameters by name, in model order (the flat order).

    Args:
        model: the network.
        params: the optimised parameters (e.g. a group's); ``None``: every parameter with
            ``requires_grad``.

    Raises:
        ValueError: if a parameter in ``params`` is not a parameter of ``model``.
    """
    named = list(model.named_parameters())
    if params is None:
        return {name: p for name, p in named if p.requires_grad}
    wanted = {id(p) for p in params}
    out = {name: p for name, p in named if id(p) in wanted}
    if len(out) != len(wanted):
        raise ValueError(
            f"{len(wanted) - len(out)} optimised parameter(s) are not parameters of the model "
            f"{type(model).__name__}; curvature products need model parameters"
        )
    return out


def params_by_name(model: nn.Module, params: Iterable[Tensor] | None = None) -> Params:
    """:func:`named_parameters_of`, detached (sharing storage with the parameters)."""
    return {name: p.detach() for name, p in named_parameters_of(model, params).items()}


def single_group_parameters(optimizer: Optimizer, model: nn.Module) -> list[nn.Parameter]:
    """The only group's parameters in model order, for methods whose curvature couples them all.

    Raises:
        ValueError: with more than one parameter group, or a parameter not of ``model``.
    """
    name = type(optimizer).__name__
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"{name} supports one parameter group, got {len(optimizer.param_groups)}")
    return list(named_parameters_of(model, optimizer.param_groups[0]["params"]).values())


def _tensors(vector: Vector) -> Iterable[Tensor]:
    return vector.values() if isinstance(vector, Mapping) else vector


def flatten(vector: Vector) -> Tensor:
    """Concatenate a vector (dict or list of tensors) into one new 1-D tensor, in its order."""
    return torch.cat([t.reshape(-1) for t in _tensors(vector)])


def split_like(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of a 1-D tensor shaped like each tensor of ``like`` (inverse of :func:`flatten`)."""
    sizes = [t.numel() for t in like]
    if sum(sizes) != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} elements, the parameters {sum(sizes)}")
    return [piece.view_as(ref) for ref, piece in zip(like, torch.split(flat, sizes), strict=True)]


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Views of a 1-D tensor as a :data:`Params` dict shaped like ``like``."""
    return dict(zip(like, split_like(flat, list(like.values())), strict=True))


def dot(a: Vector, b: Vector) -> Tensor:
    """``aᵀb`` as a 0-d tensor (no host sync): dicts pair by name, lists by position.

    Summed per parameter, then over parameters (not one flat dot): the rounding every caller
    here has always had.
    """
    pairs = [(x, b[k]) for k, x in a.items()] if isinstance(a, Mapping) else zip(a, b, strict=True)
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in pairs]).sum()


def flat_gradient(params: Iterable[Tensor]) -> Tensor:
    """``g`` as one flat vector (zeros where a parameter got no gradient)."""
    return flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])


def set_flat(params: Sequence[Tensor], flat: Tensor) -> None:
    """Copy a flat vector into the parameters (in place, under ``no_grad`` by the caller)."""
    for p, piece in zip(params, split_like(flat, params), strict=True):
        p.copy_(piece)
