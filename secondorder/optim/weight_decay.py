"""Weight decay only on the weights of convolutions and linear layers.

Goyal et al. 2017 ("Accurate, Large Minibatch SGD") and the MLPerf ResNet-50 reference apply no
weight decay to the learnable BatchNorm coefficients (γ, β) nor to biases. Those are exactly the
parameters with at most one dimension (biases, and the affine weights of BatchNorm, LayerNorm
and GroupNorm over channels), so the rule needs no model: :func:`decay_groups` splits each
parameter group into the parameters that decay and those that get ``weight_decay = 0``. Every
optimizer with a ``weight_decay`` takes the option ``exclude_norm_and_bias_from_weight_decay``
and calls it before building its groups; what a parameter's group says is all that changes, so
K-FAC's factors and preconditioner are untouched and only its decay term ``ηθ`` loses those
parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

__all__ = ["decay_groups", "is_decayed"]


def is_decayed(p: Tensor) -> bool:
    """Whether weight decay applies to ``p`` under the exclusion: matrices and kernels only."""
    return p.ndim > 1


def decay_groups(
    params: Iterable[Tensor] | Iterable[dict[str, Any]], *, exclude: bool
) -> list[Tensor] | list[dict[str, Any]]:
    """``params`` unchanged (``exclude`` false), else each group split in two: its decayed
    parameters, and its norm and bias parameters with ``weight_decay = 0``.

    Without exclusion the parameters are handed on as given, so an optimizer built without
    the option is the same object as before (same groups, same order).
    """
    params = list(params)
    if not exclude:
        return params
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    split: list[dict[str, Any]] = []
    for group in groups:
        members = list(group["params"])
        options = {k: v for k, v in group.items() if k != "params"}
        decayed = [p for p in members if is_decayed(p)]
        plain = [p for p in members if not is_decayed(p)]
        if decayed:
            split.append({**options, "params": decayed})
        if plain:
            split.append({**options, "params": plain, "weight_decay": 0.0})
    return split
