"""BatchNorm running statistics that are the same on every rank.

Each rank updates its BatchNorm running mean and variance from its own share of the batch, so
after training steps the ranks hold different statistics: each would evaluate with its own, and
a saved model would hold rank 0's. :func:`average_norm_statistics` replaces them by their mean
over ranks (the trainer calls it before every evaluation and every save); with equal shares per
rank that is the running average over the whole global batch's statistics, as one process would
have kept them up to the variance's between-rank term.

``model.sync_bn`` goes further and normalises with the global batch's statistics in every
forward (:func:`convert_sync_batchnorm`, ``torch.nn.SyncBatchNorm``): torch.distributed only,
and torch runs it on GPUs only.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["average_norm_statistics", "convert_sync_batchnorm", "norm_layers"]


def norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def average_norm_statistics(model: nn.Module, comm) -> None:
    """Set every rank's BatchNorm ``running_mean``, ``running_var`` and ``num_batches_tracked``
    to their mean over ranks: one bucketed all-reduce (no collective with one rank or none)."""
    layers = norm_layers(model)
    if comm is None or comm.world_size == 1 or not layers:
        return
    stats = [t for m in layers for t in (m.running_mean, m.running_var) if t is not None]
    counts = [m.num_batches_tracked for m in layers if m.num_batches_tracked is not None]
    # The integer counts travel as float64 (an average of integers), in the same call.
    count_values = torch.stack([c.double() for c in counts]) if counts else None
    comm.all_reduce_tensors(stats + ([count_values] if count_values is not None else []), op="avg")
    for count, value in zip(counts, count_values if count_values is not None else [], strict=True):
        count.copy_(value.round().to(count.dtype))


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm replaced by ``torch.nn.SyncBatchNorm`` (same parameters
    and buffers, so state_dicts and K-FAC's layer search are unchanged: K-FAC preconditions
    convolutions and linear layers only and leaves norm layers to its other path)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
