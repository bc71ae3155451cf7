"""What K-FAC and its curvature workers exchange: one narrow interface in each direction.

Asynchronous curvature (Ba, Grosse & Martens 2017, section 5) moves the factor statistics and
the factor decompositions off the training step. The workers (:mod:`.async_curvature`,
:mod:`.async_stats`) never read or write the optimizer's state; they see a
:class:`CurvatureHost`, which :class:`~.optimizer.KFAC` implements, and the optimizer sees them
as :class:`CurvatureWorkers`::

    K-FAC (CurvatureHost)                              workers (CurvatureWorkers)
    curvature_layout(), model_parameters()    ->       built once from them
    factor_snapshot(): A, G, λ                ->       update(k, publish=True): inversion input
    install_decompositions(...)               <-       update(k): newest completed results
    update_factors(take_statistics())         <-       statistics workers' factor sums

The version of a snapshot is the step ``k`` at which it was published.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "CurvatureHost",
    "CurvatureLayout",
    "CurvatureWorkers",
    "FactorSnapshot",
    "FactorSums",
    "LayerInfo",
    "StatisticsRecipe",
]


@dataclass(frozen=True)
class LayerInfo:
    """One K-FAC layer as the workers see it: its name, factors and their sizes."""

    name: str
    factor_dims: dict[str, int]
    has_bias: bool
    double: bool  # doubly factored (``K``, ``Psi``, ``G``)


@dataclass(frozen=True)
class StatisticsRecipe:
    """What a statistics worker needs to find the same K-FAC layers in its own model replica
    and to draw the same kind of statistics (``find_layers``' and the capture's arguments)."""

    param_names: tuple[str, ...]  # the optimised parameters, by name in the model
    exclude: tuple[str, ...]
    double_factor_threshold: int
    fisher_type: str
    loss_kind: str
    seed: int


@dataclass(frozen=True)
class CurvatureLayout:
    """The optimizer's description of itself, fixed at construction.

    Attributes:
        layers: the K-FAC layers, in the optimizer's order (layer ``i`` is ``"L{i}"`` in jobs).
        method: ``"eigen"`` or ``"inverse"``: which decompositions to compute.
        dtype: the factors' dtype; ``device``: where results are installed.
        rank: this rank; ``world_size``: the number of ranks.
        factor_owner: the rank that decomposes each ``(layer, factor)``.
        shares_results: per-factor ownership on several ranks: every rank needs every result,
            broadcast from its owner.
        statistics: the recipe of statistics workers.
    """

    layers: tuple[LayerInfo, ...]
    method: str
    dtype: torch.dtype
    device: torch.device
    rank: int
    world_size: int
    factor_owner: dict[tuple[int, str], int]
    shares_results: bool
    statistics: StatisticsRecipe


@dataclass
class FactorSnapshot:
    """The current factors (references, not copies: read before the next step) and ``λ``.

    ``factors[i]`` maps factor names to matrices, or is ``None`` while layer ``i`` has none.
    """

    damping: float
    factors: list[dict[str, Tensor] | None]


@dataclass
class FactorSums:
    """Unnormalised factor sums with their counts, what ``update_factors`` folds in (the
    fields of a finished :class:`~.capture.FactorCapture`)."""

    sums: list[dict[str, Tensor]]
    rows: list[float]
    examples: list[float]


class CurvatureHost(Protocol):
    """What the K-FAC optimizer offers its curvature workers."""

    comm: Any  # the communicator (``None``: one process)

    def curvature_layout(self) -> CurvatureLayout: ...

    def model_parameters(self) -> Iterable[tuple[str, Tensor]]:
        """The model's named parameters (their current values, for statistics workers)."""
        ...

    def factor_snapshot(self) -> FactorSnapshot: ...

    def decompositions(self, layer: int, factor: str) -> list[Tensor] | None:
        """The decomposition of a factor in use now (``None``: none yet)."""
        ...

    def install_decompositions(
        self,
        decompositions: Mapping[tuple[int, str], Sequence[Tensor]],
        bias_inverses: Mapping[int, Tensor],
    ) -> None:
        """Use these decompositions (and doubly-factored bias blocks) from now on."""
        ...

    def detach_workers(self, workers: CurvatureWorkers) -> None:
        """``workers`` stopped: compute in the training step again."""
        ...


class CurvatureWorkers(Protocol):
    """What the K-FAC optimizer calls on its attached workers, in this order, every step."""

    computes_statistics: bool

    def before_step(self, k: int) -> None:
        """Statistics workers: refresh their parameters when due, collect finished results."""
        ...

    def take_statistics(self) -> FactorSums:
        """At factor steps: the statistics gathered since the last one."""
        ...

    def update(self, k: int, *, publish: bool, missing: bool) -> tuple[bool, int, int]:
        """Publish the factors (when due) and install the newest decompositions; whether they
        changed, and the retries and failures they reported."""
        ...

    def diagnostics(self, k: int) -> dict[str, float]: ...

    def after_load(self) -> None:
        """The optimizer loaded a checkpoint."""
        ...

    def close(self) -> None: ...
