"""Where K-FAC's curvature comes from: steps 1-4 of the algorithm box in :mod:`.optimizer`.

The Kronecker factors (steps 1-3: captured by hooks during the closure, or summed by
statistics workers) and their decompositions (step 4: in the step, or by inversion workers).
:class:`KroneckerCurvature` is mixed into :class:`~.optimizer.KFAC`, which keeps the update
(steps 5-9) and checkpoints. Here, too, is all that curvature workers may see of the optimizer,
the :class:`~.exchange.CurvatureHost` interface: a description of its layers (built once), the
current factors and ``λ``, the decompositions in use, and one way to install new ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from secondorder.optim.kfac.assignment import Assignment
from secondorder.optim.kfac.async_curvature import AsyncCurvature
from secondorder.optim.kfac.capture import FactorCapture
from secondorder.optim.kfac.exchange import (
    CurvatureLayout,
    CurvatureWorkers,
    FactorSnapshot,
    FactorSums,
    LayerInfo,
    StatisticsRecipe,
)
from secondorder.optim.kfac.factors import update_factors
from secondorder.optim.kfac.inverse import (
    decomposition_keys,
    decompositions_missing,
    refresh_decompositions,
)
from secondorder.optim.kfac.layers import KFACLayer
from secondorder.optim.kfac.validation import Schedule, due
from secondorder.optim.kfac.worker_settings import WorkersSettings

__all__ = ["KroneckerCurvature"]


class KroneckerCurvature:
    """Steps 1-4 of K-FAC, curvature workers, and what they may read and write of it."""

    # Set by the optimizer's constructor.
    model: nn.Module
    comm: Any
    layers: list[KFACLayer]
    assignment: Assignment
    layer_options: dict[str, Any]
    inverse_method: str
    fisher_type: str
    loss_kind: str
    seed: int
    rank: int
    world_size: int
    curvature_workers: CurvatureWorkers | None
    param_groups: list[dict[str, Any]]
    state: Any
    damping: float
    diagnostics: dict[str, float | Tensor]
    factor_update_every: Schedule
    bucket_mb: float
    _generator: torch.Generator
    global_state: dict[str, Any]
    _maybe_missing: bool
    _groups: list[tuple[list[int], dict[str, Tensor]]] | None
    _timing_sums: dict[str, float]
    _timing_steps: int

    def _record_timing(self, timing: dict[str, float]) -> None:
        """The ``time_*_s`` diagnostics: seconds per step averaged since the last reset, so the
        factor and inverse work done every N steps reaches the record that covers it (amortised)
        instead of counting only when a logged step happens to be a factor or inverse step."""
        self._timing_steps += 1
        for key, seconds in timing.items():
            self._timing_sums[key] = self._timing_sums.get(key, 0.0) + seconds
            self.diagnostics[key] = self._timing_sums[key] / self._timing_steps

    def reset_diagnostics_interval(self) -> None:
        """Start a new averaging interval for the ``time_*_s`` diagnostics (the trainer calls it
        after every record; a plain loop may call it after each read)."""
        self._timing_sums, self._timing_steps = {}, 0

    def _closure_and_factors(self, closure: Callable[[], Tensor], k: int, timing: dict) -> Tensor:
        """Steps 1-3: the closure; at factor steps the hooks capture the factor statistics
        during it, or the statistics workers' sums are folded in instead."""
        factor_step = due(self.factor_update_every, k, "factor_update_every")
        scale = getattr(getattr(closure, "loss_scaler", None), "scale", 1.0)
        workers = self.curvature_workers
        if workers is not None and workers.computes_statistics:
            workers.before_step(k)  # refresh their parameters, take their results
            if factor_step:  # fold the workers' statistics: no forward/backward here
                start = time.perf_counter()
                self._fold_statistics(workers.take_statistics())
                timing["time_factors_s"] = time.perf_counter() - start
            factor_step = False
        if not factor_step:
            with torch.enable_grad():
                return closure()
        capture = FactorCapture(
            self.layers,
            self.model,
            fisher_type=self.fisher_type,
            loss_kind=self.loss_kind,
            generator=self._generator,
            rank=self.rank,
            world_size=self.world_size,
        )
        with capture, torch.enable_grad():
            loss = closure()
        start = time.perf_counter()
        capture.finish(grad_scale=float(scale))
        self._fold_statistics(capture)
        timing["time_factors_s"] = capture.seconds + time.perf_counter() - start
        return loss

    def _fold_statistics(self, statistics: FactorCapture | FactorSums) -> None:
        factor_decay = self.param_groups[0]["factor_decay"]
        update_factors(
            self.layers,
            self.state,
            statistics,
            comm=self.comm,
            factor_decay=factor_decay,
            bucket_mb=self.bucket_mb,
        )
        self._maybe_missing = True

    def _decompositions(self, k: int, scheduled: bool, timing: dict) -> None:
        """Step 4 at scheduled steps, or when a layer lacks a decomposition: in the step, or
        taken from the curvature workers (which apply their staleness policy)."""
        # A layer can only lack a decomposition after a factor update or a load.
        missing = self._maybe_missing and decompositions_missing(
            self.layers, self.state, self.assignment, rank=self.rank, method=self.inverse_method
        )
        self._maybe_missing = False
        workers = self.curvature_workers
        if workers is None and not (scheduled or missing):
            return
        start = time.perf_counter()
        if workers is not None:
            publish = scheduled or missing
            changed, retries, failures = workers.update(k, publish=publish, missing=missing)
            self.diagnostics.update(workers.diagnostics(k))
        else:
            changed = True
            retries, failures = refresh_decompositions(
                self.layers,
                self.state,
                self.assignment,
                rank=self.rank,
                comm=self.comm,
                method=self.inverse_method,
                damping=self.damping,
            )
        if changed:
            self._groups = None
        self._count_inverse_results(retries, failures, exchange_counts=scheduled)
        timing["time_inverse_s"] = time.perf_counter() - start

    def _count_inverse_results(self, retries: int, failures: int, *, exchange_counts: bool) -> None:
        counts = self.global_state
        counts["inverse_retries"] += retries
        counts["inverse_failures"] += failures
        if exchange_counts:  # every rank is here at scheduled inverse steps
            totals = torch.tensor(
                [float(counts["inverse_retries"]), float(counts["inverse_failures"])],
                dtype=torch.float64,
                device=counts["skipped_steps"].device,
            )
            if self.comm is not None:
                self.comm.all_reduce(totals, op="sum")
            retries_total, failures_total = totals.tolist()
            self.diagnostics["inverse_retries"] = int(retries_total)
            self.diagnostics["inverse_failures"] = int(failures_total)

    # -- curvature workers (the exchange.CurvatureHost interface) --------------------------------

    def attach_workers(self, settings: WorkersSettings, source: Any = None) -> AsyncCurvature:
        """Hand step 4 (and, with ``settings.stats.num_processes > 0``, steps 2-3's statistics)
        to curvature workers (``settings``: a :class:`~.worker_settings.WorkersSettings`;
        ``source``: a :class:`~secondorder.trainer.stats_source.StatsSource`, needed by
        statistics workers). Their ``close()`` stops them and brings back the in-process
        computations.
        """
        if self.curvature_workers is not None:
            self.curvature_workers.close()
        workers = AsyncCurvature(self, settings, source=source)
        self.curvature_workers = workers
        return workers

    def detach_workers(self, workers: CurvatureWorkers) -> None:
        """``workers`` stopped: factors and decompositions are computed in the step again."""
        if self.curvature_workers is workers:
            self.curvature_workers = None

    def curvature_layout(self) -> CurvatureLayout:
        weight = self.layers[0].weight if self.layers else None
        optimised = {id(p) for group in self.param_groups for p in group["params"]}
        layers = tuple(
            LayerInfo(
                layer.name, layer.factor_dims(), layer.has_bias, layer.double_shape is not None
            )
            for layer in self.layers
        )
        recipe = StatisticsRecipe(
            param_names=tuple(n for n, p in self.model.named_parameters() if id(p) in optimised),
            exclude=tuple(self.layer_options["exclude"]),
            double_factor_threshold=self.layer_options["double_factor_threshold"],
            fisher_type=self.fisher_type,
            loss_kind=self.loss_kind,
            seed=self.seed,
        )
        return CurvatureLayout(
            layers=layers,
            method=self.inverse_method,
            dtype=weight.dtype if weight is not None else torch.get_default_dtype(),
            device=weight.device if weight is not None else torch.device("cpu"),
            rank=self.rank,
            world_size=self.world_size,
            factor_owner=dict(self.assignment.factor_owner),
            shares_results=self.world_size > 1 and self.assignment.layer_owner is None,
            statistics=recipe,
        )

    def model_parameters(self) -> Iterator[tuple[str, Tensor]]:
        return self.model.named_parameters()

    def factor_snapshot(self) -> FactorSnapshot:
        factors: list[dict[str, Tensor] | None] = []
        for layer in self.layers:
            state = self.state[layer.weight]
            present = "G" in state
            factors.append({name: state[name] for name in layer.factor_dims()} if present else None)
        return FactorSnapshot(self.damping, factors)

    def decompositions(self, layer: int, factor: str) -> list[Tensor] | None:
        state = self.state[self.layers[layer].weight]
        keys = decomposition_keys(factor, self.inverse_method)
        return [state[key] for key in keys] if all(key in state for key in keys) else None

    def install_decompositions(
        self,
        decompositions: Mapping[tuple[int, str], Sequence[Tensor]],
        bias_inverses: Mapping[int, Tensor],
    ) -> None:
        """Installs only; ``update`` tells the step whether to rebuild its stacked groups."""
        for index, tensor in bias_inverses.items():
            self.state[self.layers[index].weight]["bias_inv"] = tensor
        for (index, name), tensors in decompositions.items():
            state = self.state[self.layers[index].weight]
            keys = decomposition_keys(name, self.inverse_method)
            for key, tensor in zip(keys, tensors, strict=True):
                state[key] = tensor
