"""Who does what: which rank decomposes which factor, and who preconditions which layer.

Distributed K-FAC (Ba, Grosse & Martens 2017) spreads the factor inversions over workers; the
KAISA scheme (Pauloski et al. 2021, "KAISA: an adaptive second-order optimizer framework for
deep neural networks") adds the ``grad_worker_fraction`` trade-off. Two layouts are
implemented:

- ``grad_worker_fraction = 1`` ("communication-optimal"): every factor is one job; jobs go to
  ranks by greedy longest-processing-time on cost ``n³`` (``n`` = factor dimension); each result
  is broadcast from its owner, and every rank preconditions every layer itself.
- ``grad_worker_fraction = 1 / world_size`` ("memory-optimal"): every LAYER is one job (cost
  ``Σ n³`` over its factors); only the owner keeps the layer's decompositions and computes its
  preconditioned gradient, which is then broadcast from the owner.

Greedy LPT (Graham 1969): jobs in decreasing cost, each to the currently least-loaded rank
(ties: lower job index first, lower rank first), so every rank derives the same assignment with
no communication; its makespan is at most ``4/3 − 1/(3W)`` times the optimum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from secondorder.optim.kfac.layers import KFACLayer

__all__ = ["Assignment", "build_assignment", "lpt_assign"]


def lpt_assign(costs: Sequence[float], world_size: int) -> list[int]:
    """The owner rank of every job under greedy longest-processing-time scheduling."""
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[job] = rank
        loads[rank] += costs[job]
    return owners


@dataclass(frozen=True)
class Assignment:
    """Who decomposes each factor and who preconditions each layer.

    Attributes:
        factor_owner: ``(layer index, factor name) -> rank``.
        layer_owner: ``layer index -> rank`` preconditioning it, or ``None`` when every rank
            preconditions every layer (``grad_worker_fraction = 1``).
        loads: total ``n³`` cost per rank.
    """

    factor_owner: dict[tuple[int, str], int]
    layer_owner: dict[int, int] | None
    loads: list[float]

    def preconditions(self, index: int, rank: int) -> bool:
        """Whether ``rank`` preconditions layer ``index`` (and keeps its decompositions)."""
        return self.layer_owner is None or self.layer_owner[index] == rank


def build_assignment(
    layers: Sequence[KFACLayer], *, world_size: int, memory_optimal: bool
) -> Assignment:
    """Greedy LPT assignment of the layers' factors (or whole layers) to ``world_size`` ranks."""
    if memory_optimal:
        costs = [float(sum(n**3 for n in layer.factor_dims().values())) for layer in layers]
        owners = lpt_assign(costs, world_size)
        factor_owner = {
            (index, name): owners[index]
            for index, layer in enumerate(layers)
            for name in layer.factor_dims()
        }
        layer_owner: dict[int, int] | None = dict(enumerate(owners))
    else:
        jobs = [
            (index, name, n)
            for index, layer in enumerate(layers)
            for name, n in layer.factor_dims().items()
        ]
        costs = [float(n**3) for _, _, n in jobs]
        owners = lpt_assign(costs, world_size)
        factor_owner = {(i, name): r for (i, name, _), r in zip(jobs, owners, strict=True)}
        layer_owner = None
    loads = [0.0] * world_size
    for cost, rank in zip(costs, owners, strict=True):
        loads[rank] += cost
    return Assignment(factor_owner, layer_owner, loads)
