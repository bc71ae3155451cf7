"""Running Kronecker factors: batch statistics → global average → exponential running average.

Martens & Grosse 2015, section 5: ``A ← β A + (1 − β) A_batch`` (and ``G``, ``K``, ``Ψ``) with
``β = factor_decay``; the first update of a factor sets it to its batch value. Batch statistics
are averaged over the GLOBAL batch: every rank's sums and counts are summed over ranks
(:func:`~secondorder.optim.kfac.distributed.reduce_sums`) before the division, so the result
equals a single process's on the whole batch (up to summation order). A factor whose batch
value is not finite keeps its previous value (checked on the device, no host sync); a layer no
rank ran at this step keeps its factors.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from secondorder.optim.kfac.capture import FactorCapture
from secondorder.optim.kfac.distributed import reduce_sums
from secondorder.optim.kfac.layers import KFACLayer

__all__ = ["update_factors"]


def update_factors(
    layers: Sequence[KFACLayer],
    state: MutableMapping[Tensor, dict[str, Any]],
    capture: FactorCapture,
    *,
    comm: Any,
    factor_decay: float,
    bucket_mb: float,
) -> None:
    """Fold one step's captured statistics into ``state[layer.weight][name]``.

    Args:
        layers: the K-FAC layers (same order as ``capture``).
        state: the optimizer's per-parameter state.
        capture: the finished capture of this step (per-example ``G`` scale).
        comm: communicator or ``None``.
        factor_decay: ``β``.
        bucket_mb: all-reduce bucket size.
    """
    entries = []  # (layer index, factor name, batch sum)
    for index, layer in enumerate(layers):
        for name, n in layer.factor_dims().items():
            total = capture.sums[index].get(name)
            if total is None:  # this rank did not run the layer; still joins the collective
                total = layer.weight.new_zeros(n, n)
            entries.append((index, name, total))
    if not entries:
        return
    device = layers[0].weight.device
    pairs = [[float(r), float(e)] for r, e in zip(capture.rows, capture.examples, strict=True)]
    counts = torch.tensor(pairs, dtype=torch.float64, device=device)
    reduce_sums(comm, [total for _, _, total in entries], counts, bucket_mb=bucket_mb)
    host_counts = counts.tolist()  # one host sync per factor step, not per layer
    for index, name, total in entries:
        # A, K, Ψ average over rows (examples · positions); G over examples (capture.py).
        count = host_counts[index][1 if name == "G" else 0]
        if count <= 0:
            continue
        batch = total.div_(count)
        finite = torch.isfinite(batch).all()
        layer_state = state[layers[index].weight]
        if name not in layer_state:
            eye = torch.eye(batch.shape[0], dtype=batch.dtype, device=batch.device)
            layer_state[name] = torch.where(finite, batch, eye)
        else:  # A ← β A + (1 − β) A_batch, or A unchanged when A_batch is not finite
            old = layer_state[name]
            old.lerp_(torch.where(finite, batch, old), 1 - factor_decay)
