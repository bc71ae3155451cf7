"""Loss kinds. The kind, not just the number, matters to curvature methods: it defines the
Gauss-Newton matrix and the distribution that true-Fisher targets are sampled from.

- ``cross_entropy``: softmax cross-entropy over class logits, integer targets.
- ``mse``: Gaussian negative log-likelihood up to constants, ``mean((f - y)^2)``.
- ``bernoulli``: sigmoid cross-entropy on logits, targets in [0, 1] (the autoencoder's loss).

All reduce by the mean over the batch (and over output elements for ``mse``/``bernoulli``), so a
loss on a global batch equals the average of its equal-sized micro-batch losses.

Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture") replaces the
one-hot target of ``cross_entropy`` by ``(1 - ε) onehot + ε / K`` over ``K`` classes; it is a
training-loss option only (evaluation reports the plain loss).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

LossKind = Literal["cross_entropy", "mse", "bernoulli"]
LOSS_KINDS: tuple[str, ...] = get_args(LossKind)


def loss_value(
    kind: LossKind,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The loss of ``outputs`` against ``targets`` (``reduction``: ``mean`` or ``sum``).

    ``sum`` adds per-example losses (each example's loss being its mean over elements), so
    ``sum / batch`` equals ``mean`` — used by evaluation, which accumulates over batches.
    ``label_smoothing`` ``ε`` in ``[0, 1)`` applies to ``cross_entropy`` only.
    """
    if label_smoothing and kind != "cross_entropy":
        raise ValueError(f"label_smoothing needs the cross_entropy loss, got loss kind {kind!r}")
    if kind == "cross_entropy":
        if label_smoothing:
            return F.cross_entropy(
                outputs, targets, reduction=reduction, label_smoothing=label_smoothing
            )
        return F.cross_entropy(outputs, targets, reduction=reduction)
    if kind == "mse":
        per_example = (outputs - targets).pow(2).flatten(1).mean(1)
    elif kind == "bernoulli":
        elementwise = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        per_example = elementwise.flatten(1).mean(1)
    else:
        raise ValueError(f"Unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    return per_example.mean() if reduction == "mean" else per_example.sum()
