"""K-FAC's statistics workers: factor statistics computed off the training rank's critical path.

Ba, Grosse & Martens 2017, "Distributed Second-Order Optimization using Kronecker-Factored
Approximations", section 5 ("asynchronous statistics"): the statistics ``A_b``, ``G_b`` of the
Kronecker factors are computed by separate workers on their own mini-batches, with parameters
that lag the training rank's by a few steps, because the curvature changes slowly.

Each worker (a repeating :class:`~secondorder.distributed.workers.Job`) runs
:func:`factor_statistics` again and again on the newest parameter snapshot: it rebuilds the
model and the training set once from a :class:`~secondorder.trainer.stats_source.StatsSource`
recipe, then per iteration loads the snapshot, draws ``batch_size`` examples (its own seed
stream: seed, rank, worker, iteration) and captures the factor sums with the same
:class:`~.capture.FactorCapture` as the training step (true Fisher: one sampled backward;
empirical: the loss's backward), in the model's dtype on the worker's CPU.

The training rank (:class:`StatisticsWorkers`)::

    every refresh_every steps:    publish θ (this step's parameters, before its update)
    every step:                   add each worker's newest result not yet taken to S (sums, counts)
    at factor steps (K-FAC's factor_update_every): update_factors(S)  # Σ over ranks, then
                                  A ← β A + (1 − β) S_A / rows,  G likewise;  S ← 0

``update_factors`` is the synchronous path's own function (one all-reduce of the sums and
counts), so the ranks' factors stay identical; every rank's workers draw different examples,
and their sums are pooled. The training step itself does no forward or backward for
statistics. A layer with no statistics yet is preconditioned by the plain gradient (as in
synchronous K-FAC before a layer's first factor step); the first factor step waits for the
workers' first results (``wait_timeout_s``) so that training starts with curvature. A worker
whose results are lost (double-buffered slots: a result not taken before the next two is
overwritten) only costs examples. ``mode="sync"`` runs one iteration per worker in-process at
each factor step, on the snapshot of the last refresh: deterministic.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from secondorder.distributed.workers import Job, WorkerPool, to_device
from secondorder.optim.curvature import batch_loss
from secondorder.optim.kfac.capture import FactorCapture
from secondorder.optim.kfac.exchange import CurvatureHost, CurvatureLayout, FactorSums
from secondorder.optim.kfac.layers import KFACLayer, find_layers
from secondorder.optim.kfac.worker_settings import WorkersSettings

__all__ = ["StatisticsWorkers", "factor_statistics", "stream_seed"]


@dataclass
class _Replica:
    model: torch.nn.Module
    batch: Any
    size: int
    params: dict[str, Tensor]
    layers: list[KFACLayer]


_REPLICAS: dict[str, _Replica] = {}  # per worker process: built once, reused every iteration


def _replica(options: dict[str, Any]) -> _Replica:
    key = options["key"]
    if key not in _REPLICAS:
        model, batch, size = options["source"].build()
        model.train()
        named = dict(model.named_parameters())
        missing = [name for name in options["param_names"] if name not in named]
        if missing:
            raise ValueError(f"the statistics worker's model has no parameters {missing}")
        covered = [named[name] for name in options["param_names"]]
        threshold = options["double_factor_threshold"]
        layers = find_layers(
            model, covered, exclude=list(options["exclude"]), double_factor_threshold=threshold
        )
        dims = [layer.factor_dims() for layer in layers]
        if [layer.name for layer in layers] != options["layer_names"] or dims != options["dims"]:
            raise ValueError("the statistics worker's model has other K-FAC layers than the rank's")
        _REPLICAS.clear()  # one replica per process
        _REPLICAS[key] = _Replica(model, batch, size, named, layers)
    return _REPLICAS[key]


def stream_seed(seed: int, rank: int, worker: int, iteration: int) -> int:
    """A distinct seed per (seed, rank, worker, iteration): every draw is reproducible."""
    return (((seed * 1_000_003 + rank) * 10_007 + worker) * 1_000_000_007 + iteration) % 2**63


def factor_statistics(inputs: dict[str, Tensor], options: dict[str, Any]) -> dict[str, Tensor]:
    """Factor sums of one fresh mini-batch at the parameter snapshot (pure; runs in a worker).

    Args:
        inputs: ``"P.{name}"`` the model's parameters.
        options: ``source`` (a ``StatsSource``), ``key`` (replica id), ``param_names``,
            ``layer_names``, ``dims``, ``exclude``, ``double_factor_threshold`` (the rank's
            K-FAC layers, checked), ``fisher_type``, ``loss_kind``, ``batch_size``, ``seed``,
            ``rank``, ``worker``, and from the executor ``iteration`` and ``version``.

    Returns:
        ``"L{i}.{A|G|K|Psi}"`` unnormalised sums (A with the homogeneous coordinate),
        ``"counts"`` (layers x [rows, examples]) and ``"version"`` (the snapshot's step).
    """
    replica = _replica(options)
    with torch.no_grad():
        for name, p in replica.params.items():
            p.copy_(inputs[f"P.{name}"])
    seed = stream_seed(options["seed"], options["rank"], options["worker"], options["iteration"])
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(replica.size, (options["batch_size"],), generator=generator)
    x, y = replica.batch(indices)
    fisher = options["fisher_type"]
    capture = FactorCapture(
        replica.layers,
        replica.model,
        fisher_type=fisher,
        loss_kind=options["loss_kind"],
        generator=generator,
    )
    with capture, torch.enable_grad():
        outputs = replica.model(x)
        if fisher == "empirical":  # the hooks see the mean loss's gradients, as in a closure
            params = [p for p in replica.params.values() if p.requires_grad]
            torch.autograd.grad(
                batch_loss(options["loss_kind"], outputs, y), params, allow_unused=True
            )
    capture.finish()
    out: dict[str, Tensor] = {}
    for i, (layer, sums) in enumerate(zip(replica.layers, capture.sums, strict=True)):
        for name, n in layer.factor_dims().items():
            out[f"L{i}.{name}"] = sums.get(name, layer.weight.new_zeros(n, n))
    counts = [[float(r), float(e)] for r, e in zip(capture.rows, capture.examples, strict=True)]
    out["counts"] = torch.tensor(counts, dtype=torch.float64).reshape(len(replica.layers), 2)
    out["version"] = torch.tensor(float(options["version"]), dtype=torch.float64)
    return out


class StatisticsWorkers:
    """The statistics workers of one K-FAC optimizer (part of ``AsyncCurvature``).

    Args:
        host: the optimizer, seen through :class:`~.exchange.CurvatureHost` (its model's
            parameters are published to the workers).
        layout: ``host``'s layout (layers, statistics recipe, rank).
        settings: the ``workers`` settings (``stats`` sizes, ``mode``, health limits).
        source: the recipe to rebuild model and training data in the workers.
    """

    def __init__(
        self, host: CurvatureHost, layout: CurvatureLayout, settings: WorkersSettings, source: Any
    ):
        self.host, self.layout, self.settings = host, layout, settings
        stats, recipe = settings.stats, layout.statistics
        layers = layout.layers
        inputs = {f"P.{name}": (tuple(p.shape), p.dtype) for name, p in host.model_parameters()}
        outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "counts": ((len(layers), 2), torch.float64),
            "version": ((), torch.float64),
        }
        for i, info in enumerate(layers):
            for name, n in info.factor_dims.items():
                outputs[f"L{i}.{name}"] = ((n, n), layout.dtype)
        common = {
            "source": source,
            "key": uuid.uuid4().hex,
            "param_names": list(recipe.param_names),
            "layer_names": [info.name for info in layers],
            "dims": [dict(info.factor_dims) for info in layers],
            "exclude": list(recipe.exclude),
            "double_factor_threshold": recipe.double_factor_threshold,
            "fisher_type": recipe.fisher_type,
            "loss_kind": recipe.loss_kind,
            "batch_size": stats.batch_size,
            "seed": recipe.seed,
            "rank": layout.rank,
        }
        jobs = [
            Job(factor_statistics, inputs, outputs, {**common, "worker": j}, repeat=True)
            for j in range(stats.num_processes)
        ]
        self.pool = WorkerPool(
            jobs,
            mode=settings.mode,
            threads=stats.threads,
            heartbeat_s=settings.heartbeat_s,
            max_restarts=settings.max_restarts,
            name="statistics",
            pin_memory=bool(layers) and layout.device.type == "cuda",
            cpus=settings.cpus,
        ).start()
        self.published = -1
        self.taken = [0] * len(jobs)  # per worker: results taken so far
        self.results = 0  # results folded into the factors, all workers
        self.version = -1  # parameter step of the newest statistics taken
        self.waits = 0
        self._pending: FactorSums | None = None

    def before_step(self, k: int) -> None:
        """Refresh the workers' parameters when due; take the results finished meanwhile."""
        if self.published < 0 or k - self.published >= self.settings.stats.refresh_every:
            params = {f"P.{name}": p.detach() for name, p in self.host.model_parameters()}
            self.pool.publish(params, k)
            self.published = k
        self.pool.check()
        if self.pool.mode == "async":
            self._collect()

    def take(self) -> FactorSums:
        """The statistics gathered since the last factor step (reset to empty)."""
        if self.pool.mode == "sync":
            for j in range(len(self.taken)):
                self.pool.run_once(j)
            self._collect()
        elif self.results == 0 and self._pending is None:  # the first: wait for curvature
            self.waits += 1
            deadline = time.time() + self.settings.wait_timeout_s
            while self._pending is None and time.time() < deadline and self.pool.errors() < 2:
                self.pool.check()
                time.sleep(self.pool.poll_s)
                self._collect()
        errors = self.pool.errors()
        if errors and self.results == 0 and self._pending is None:
            raise RuntimeError(
                f"K-FAC statistics workers failed {errors} times and produced no statistics "
                "(their tracebacks are on stderr)"
            )
        layers = self.layout.layers
        pending, self._pending = self._pending, None
        if pending is None:  # nothing new: the factors keep their values (counts 0)
            sums: list[dict[str, Tensor]] = [{} for _ in layers]
            pending = FactorSums(sums, [0.0] * len(layers), [0.0] * len(layers))
        return pending

    def _collect(self) -> None:
        device = self.layout.device
        for j in range(len(self.taken)):
            if self.pool.completed_version(j) <= self.taken[j]:
                continue
            newest = self.pool.newest(j)
            if newest is None:
                continue
            count, out = newest
            self.taken[j] = count
            self.results += 1
            self.version = max(self.version, int(out["version"]))
            self._add(out, device)

    def _add(self, out: dict[str, Tensor], device: torch.device) -> None:
        layers = self.layout.layers
        counts = out["counts"].tolist()
        if self._pending is None:
            self._pending = FactorSums(
                [{} for _ in layers], [0.0] * len(layers), [0.0] * len(layers)
            )
        pending = self._pending
        for i, info in enumerate(layers):
            rows, examples = counts[i]
            if rows <= 0:
                continue
            pending.rows[i] += rows
            pending.examples[i] += examples
            for name in info.factor_dims:
                tensor = to_device(out[f"L{i}.{name}"], device)
                if name in pending.sums[i]:
                    pending.sums[i][name].add_(tensor)
                else:
                    pending.sums[i][name] = tensor.clone()

    def diagnostics(self, k: int) -> dict[str, float]:
        return {
            "stats_staleness": float(k - self.version) if self.version >= 0 else -1.0,
            "stats_results": float(self.results),
            "stats_waits": float(self.waits),
            "stats_utilisation": self.pool.utilisation(),
            "stats_errors": float(self.pool.errors()),
        }

    def after_load(self) -> None:
        """A resumed run: refresh the workers' parameters at the next step."""
        self.published = -1

    def close(self) -> None:
        self.pool.close()
