"""K-FAC's curvature workers: inversions (and statistics) off the training rank's critical path.

Ba, Grosse & Martens 2017, "Distributed Second-Order Optimization using Kronecker-Factored
Approximations", section 5 ("asynchronous inversion"): the damped inverses /
eigendecompositions of the Kronecker factors are computed on CPUs by separate workers from a
snapshot of the factors, while the training rank keeps preconditioning with the newest
completed result, because the curvature changes slowly.

:class:`AsyncCurvature` talks to the optimizer only through
:class:`~.exchange.CurvatureHost` (factors out, decompositions in) and runs
:func:`~.async_inversion.invert_factors` (and, with statistics workers,
:mod:`.async_stats`) on the generic executor :mod:`secondorder.distributed.workers`.

Versions and the staleness policy, at step ``k``::

    p  = the step whose factors were last published (published at the steps where synchronous
         K-FAC would decompose: scheduled inverse steps, or a layer without decomposition)
    v  = the version of the decompositions in use
    s  = k − p + 1 if v < p else 0      # steps run without the newest factors' inverses
    if s > max_staleness (or a layer has no decomposition at all): wait (≤ wait_timeout_s,
         then compute in-process), and count it in ``inverse_waits``

so ``max_staleness = 0`` waits at every publish and reproduces synchronous K-FAC.

Symbols: ``A``/``G`` Kronecker factors, ``λ`` damping, ``p``/``v`` versions (steps), ``s`` the
staleness reported as ``inverse_staleness``.

Multi-rank: each rank's workers decompose only the factors K-FAC's LPT assignment gives that
rank. With per-factor ownership (``grad_worker_fraction = 1``) results are broadcast from their
owners; ranks agree on WHEN with one one-element all-reduce per step while a version is
pending. With per-layer ownership nothing needs to be shared.

Lifecycle from the entry point: ``with curvature_workers(optimizer, settings, source): ...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from secondorder.distributed.workers import WorkerPool, to_device
from secondorder.optim.kfac.assignment import lpt_assign
from secondorder.optim.kfac.async_inversion import ABSENT, FAILED, inversion_job
from secondorder.optim.kfac.async_stats import StatisticsWorkers
from secondorder.optim.kfac.distributed import broadcast_from_owners
from secondorder.optim.kfac.exchange import CurvatureHost, FactorSums
from secondorder.optim.kfac.inverse import decomposition_keys, decomposition_shapes
from secondorder.optim.kfac.worker_settings import WorkersSettings

__all__ = ["AsyncCurvature", "curvature_workers"]

Item = tuple[int, str]  # (layer index, factor name)


class AsyncCurvature:
    """The curvature workers of one K-FAC optimizer (built by its ``attach_workers``).

    Args:
        host: the optimizer, seen through :class:`~.exchange.CurvatureHost`.
        settings: the ``workers`` settings (``mode`` sync | async).
        source: how statistics workers rebuild the model and data (a
            :class:`~secondorder.trainer.stats_source.StatsSource`); needed only with them.
    """

    def __init__(self, host: CurvatureHost, settings: WorkersSettings, source: Any = None):
        if settings.mode not in ("sync", "async"):
            raise ValueError(f"Invalid workers.mode for AsyncCurvature: {settings.mode!r}")
        if settings.stats.num_processes and source is None:
            raise ValueError(
                f"workers.stats.num_processes={settings.stats.num_processes}: statistics "
                "workers rebuild the model and data from the run's config; start them through "
                "the trainer (secondorder.train) or pass attach_workers(settings, source=...)"
            )
        self.host, self.settings = host, settings
        self.layout = layout = host.curvature_layout()
        self.stats: StatisticsWorkers | None = None
        self.items = [
            (i, name) for i, info in enumerate(layout.layers) for name in info.factor_dims
        ]
        mine = [item for item in self.items if layout.factor_owner[item] == layout.rank]
        count = min(settings.inversion.num_processes, len(mine)) if mine else 0
        costs = [float(layout.layers[i].factor_dims[name] ** 3) for i, name in mine]
        process_of = lpt_assign(costs, count) if count else []
        self.job_items = [
            [item for item, w in zip(mine, process_of, strict=True) if w == p] for p in range(count)
        ]
        self.pool = WorkerPool(
            [inversion_job(items, layout) for items in self.job_items],
            mode=settings.mode,
            threads=settings.inversion.threads,
            heartbeat_s=settings.heartbeat_s,
            max_restarts=settings.max_restarts,
            name="inversion",
            pin_memory=bool(layout.layers) and layout.device.type == "cuda",
            cpus=settings.cpus,
        ).start()
        self.published = -1
        self.installed = [-1] * count
        self.shared_installed = -1  # per-factor ownership on several ranks: the agreed version
        self.waits = self.fallbacks = 0
        self.staleness = 0
        self._inputs: dict[str, Tensor] = {}
        self._pending_local: dict[Item, list[Tensor]] = {}
        if settings.stats.num_processes:
            try:
                self.stats = StatisticsWorkers(host, layout, settings, source)
            except BaseException:
                self.pool.close()
                raise

    # -- the optimizer's side (exchange.CurvatureWorkers) ----------------------------------------

    @property
    def computes_statistics(self) -> bool:
        return self.stats is not None

    def before_step(self, k: int) -> None:
        if self.stats is not None:
            self.stats.before_step(k)

    def take_statistics(self) -> FactorSums:
        if self.stats is None:
            raise RuntimeError("take_statistics: these curvature workers compute no statistics")
        return self.stats.take()

    def update(self, k: int, *, publish: bool, missing: bool) -> tuple[bool, int, int]:
        """Publish (when due), apply the staleness policy, install the newest results.

        Returns:
            Whether decompositions changed, and the retries and failures they reported.
        """
        if publish:
            self._publish(k)
        self.pool.check()
        done = [self.pool.completed_version(j) for j in range(len(self.installed))]
        pending = [j for j, v in enumerate(done) if v < self.published]
        shared = self.layout.shares_results
        late = pending or (shared and self.shared_installed < self.published)
        self.staleness = k - self.published + 1 if late else 0
        results: dict[int, dict[str, Tensor]] = {}
        if late and (self.staleness > self.settings.max_staleness or missing):
            results = self._wait_for(pending)
            self.staleness = 0
        for j in range(len(self.installed)):
            newer = max(done[j], self.pool.completed_version(j)) > self.installed[j]
            if j not in results and newer:
                newest = self.pool.newest(j)
                if newest is not None:
                    self.installed[j], results[j] = newest[0], newest[1]
        return self._install(results, shared=shared)

    def diagnostics(self, k: int) -> dict[str, float]:
        """This step's ``inverse_*``, ``worker_*`` (and ``stats_*``) diagnostics."""
        out = {
            "inverse_staleness": self.staleness,
            "inverse_waits": self.waits,
            "inverse_fallbacks": self.fallbacks,
            "worker_restarts": self.pool.restarts,
            "worker_utilisation": self.pool.utilisation(),
            "worker_errors": self.pool.errors(),
        }
        if self.stats is not None:
            out.update(self.stats.diagnostics(k))
            out["worker_restarts"] += self.stats.pool.restarts
        return out

    def after_load(self) -> None:
        """A resumed run: the loaded state holds factors and the newest installed
        decompositions; the workers get fresh factors at the next publish."""
        self.published, self.shared_installed = -1, -1
        self.installed = [-1] * len(self.installed)
        if self.stats is not None:
            self.stats.after_load()

    def close(self) -> None:
        """Stop the worker processes; the optimizer goes back to in-process computations."""
        self.pool.close()
        if self.stats is not None:
            self.stats.close()
        self.host.detach_workers(self)

    # -- one step ---------------------------------------------------------------------------------

    def _wait_for(self, pending: list[int]) -> dict[int, dict[str, Tensor]]:
        """Past ``max_staleness``: wait for the published version, else compute in-process."""
        self.waits += 1
        results = {}
        for j in pending:
            if not self.pool.wait(j, self.published, timeout_s=self.settings.wait_timeout_s):
                self.fallbacks += 1
                results[j] = self.pool.compute_inline(j, self._inputs)
                self.installed[j] = self.published
        return results

    def _publish(self, k: int) -> None:
        """Snapshot the factors (identity + ``present = 0`` for a layer not yet run)."""
        snapshot = self.host.factor_snapshot()
        layout = self.layout
        inputs: dict[str, Tensor] = {}
        inputs["damping"] = torch.tensor(snapshot.damping, dtype=torch.float64)
        for i, (info, factors) in enumerate(zip(layout.layers, snapshot.factors, strict=True)):
            inputs[f"L{i}.present"] = torch.tensor(float(factors is not None), dtype=torch.float64)
            for name, n in info.factor_dims.items():
                if factors is not None:
                    inputs[f"L{i}.{name}"] = factors[name]
                else:
                    inputs[f"L{i}.{name}"] = torch.eye(n).to(layout.device, layout.dtype)
        self.pool.publish(inputs, k)
        self.published = k
        if self.pool.mode == "async":  # kept for an in-process fallback after a timed-out wait
            self._inputs = {key: t.detach().clone() for key, t in inputs.items()}

    def _install(
        self, results: dict[int, dict[str, Tensor]], *, shared: bool
    ) -> tuple[bool, int, int]:
        device, method = self.layout.device, self.layout.method
        retries = failures = 0
        local: dict[Item, list[Tensor]] = {}
        bias_inverses: dict[int, Tensor] = {}
        for j, out in results.items():
            status = out["status"].tolist()
            retries, failures = retries + int(status[-2]), failures + int(status[-1])
            for (i, name), flag in zip(self.job_items[j], status, strict=False):
                if flag == ABSENT:
                    continue
                previous = self.host.decompositions(i, name) if flag == FAILED else None
                if previous is not None:  # failed: keep the previous ...
                    if shared:  # ... which its owner still has to send
                        local[(i, name)] = previous
                    continue
                keys = decomposition_keys(name, method)
                local[(i, name)] = [to_device(out[f"L{i}.{key}"], device) for key in keys]
                if f"L{i}.bias_inv" in out:
                    bias_inverses[i] = to_device(out[f"L{i}.bias_inv"], device)
        if shared:
            self.host.install_decompositions({}, bias_inverses)
            return self._share(local), retries, failures
        self.host.install_decompositions(local, bias_inverses)
        return bool(local), retries, failures

    def _share(self, local: dict[Item, list[Tensor]]) -> bool:
        """Per-factor ownership on several ranks: once every rank holds the published version,
        all install it together, results broadcast from their owners."""
        if self.shared_installed >= self.published:
            return False
        self._pending_local.update(local)
        ready = all(v >= self.published for v in self.installed)
        flag = torch.tensor([1.0 if ready else 0.0], dtype=torch.float64)
        comm, layout = self.host.comm, self.layout
        comm.all_reduce(flag, op="sum")
        if int(flag.item()) < layout.world_size:
            return False
        factors = self.host.factor_snapshot().factors
        present = [(i, name) for i, name in self.items if factors[i] is not None]
        owner, rank = layout.factor_owner, layout.rank
        mine = {
            j: self._pending_local[item]
            for j, item in enumerate(present)
            if owner[item] == rank and item in self._pending_local
        }
        if any(owner[item] == rank and j not in mine for j, item in enumerate(present)):
            raise AssertionError("a published factor of this rank has no decomposition")
        shapes = [
            decomposition_shapes(layout.layers[i].factor_dims[name], layout.method)
            for i, name in present
        ]
        received = broadcast_from_owners(
            comm,
            [owner[item] for item in present],
            mine,
            shapes,
            dtype=layout.dtype,
            device=layout.device,
        )
        installed = {
            item: [t.clone() for t in tensors]
            for item, tensors in zip(present, received, strict=True)
        }
        self.host.install_decompositions(installed, {})
        self.shared_installed = self.published
        self._pending_local = {}
        return True


@contextlib.contextmanager
def curvature_workers(
    optimizer: Any, settings: WorkersSettings | None, source: Any = None
) -> Iterator[Any]:
    """Start the optimizer's curvature workers for the ``with`` body and always stop them.

    ``settings.mode == "none"`` (or ``None``): nothing. Otherwise the optimizer must offer
    ``attach_workers(settings, source=source)`` (``source``: how statistics workers rebuild
    the model and data, passed through untouched) returning an object with ``close()`` (K-FAC
    does); its processes are stopped on normal exit, exceptions, Ctrl-C and SIGTERM (the
    trainer turns SIGTERM into a clean stop; a hard kill of the trainer takes the workers with
    it).
    """
    if settings is None or settings.mode == "none":
        yield None
        return
    attach = getattr(optimizer, "attach_workers", None)
    if attach is None:
        raise ValueError(
            f"workers.mode={settings.mode!r} needs an optimizer with curvature workers "
            f"(kfac, kfac_eigen, kfac_inverse); got {type(optimizer).__name__}"
        )
    handle = attach(settings, source=source)
    try:
        yield handle
    finally:
        handle.close()
