"""Synchronous distributed K-FAC: 1, 2 and 4 spawned gloo ranks take the same steps (float64).

Every rank holds a consecutive shard of the same global batch; gradients and factor statistics
are averaged over ranks, so the parameters after several steps equal a single process's up to
summation order. The true-Fisher samples are drawn rank-invariantly (see sampling.py), so the
true Fisher is covered too. Each spawn runs every configuration to keep the test short.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder.distributed.testing import run_on_ranks
from secondorder.optim.closure import BatchClosure
from secondorder.optim.kfac import KFAC
from secondorder.optim.losses import loss_value

DTYPE = torch.float64
STEPS = 4

CONFIGS = [
    # Per-factor LPT, every rank preconditions; a doubly-factored Linear; LM damping.
    dict(
        inverse_method="eigen",
        fisher_type="true",
        levenberg_marquardt=True,
        damping_adapt_every=2,
        double_factor_threshold=8,
        other_preconditioner="adam",
    ),
    # KAISA memory-optimal: one rank per layer, preconditioned gradients broadcast.
    dict(inverse_method="inverse", fisher_type="empirical", grad_worker_fraction=1e-6),
    dict(
        inverse_method="eigen",
        fisher_type="true",
        grad_worker_fraction=1e-6,
        double_factor_threshold=8,
    ),
]


class Float64Closure(BatchClosure):
    """``BatchClosure`` without its ``outputs.float()`` cast, which rounds float64 to float32."""

    def loss_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_value(self.loss_kind, self.model(inputs), targets)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 3, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.LayerNorm(12),
        nn.Linear(12, 6),
        nn.Tanh(),
        nn.Linear(6, 4),
    ).to(DTYPE)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 1, 10, generator=gen, dtype=DTYPE),
            torch.randint(0, 4, (8,), generator=gen),
        )
        for _ in range(STEPS)
    ]


def _train(world_size: int) -> list[torch.Tensor]:
    """Every configuration on this rank's shard; returns the flat parameters per config."""
    comm = None
    rank = 0
    if world_size > 1:
        from secondorder.distributed.comm import TorchComm

        comm = TorchComm()
        rank = comm.rank
    results = []
    for config in CONFIGS:
        model = _model()
        opt = KFAC(
            model.parameters(),
            model=model,
            loss_kind="cross_entropy",
            comm=comm,
            lr=0.1,
            factor_update_every=1,
            inverse_update_every=2,
            kl_clip=1e-2,
            weight_decay=1e-3,
            **config,
        )
        for x, y in _batches():
            n = x.shape[0] // world_size
            shard = slice(rank * n, (rank + 1) * n)
            closure = Float64Closure(
                model=model,
                micro_batches=[(x[shard], y[shard])],
                loss_kind="cross_entropy",
                comm=comm,
            )
            opt.step(closure)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return results


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ranks_take_the_same_steps_as_one_process(world_size: int) -> None:
    single = _train(1)
    per_rank = run_on_ranks(_train, world_size=world_size, args=(world_size,), timeout_s=240)
    for results in per_rank:
        for got, expected in zip(results, single, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    for results in per_rank[1:]:  # the ranks agree bitwise
        for got, expected in zip(results, per_rank[0], strict=True):
            assert torch.equal(got, expected)
