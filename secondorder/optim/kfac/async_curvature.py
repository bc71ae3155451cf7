"""K-FAC's side of the curvature workers: inversions off the training rank's critical path.

Ba, Grosse & Martens 2017, "Distributed Second-Order Optimization using Kronecker-Factored
Approximations", section 5 ("asynchronous inversion"): the damped inverses /
eigendecompositions of the Kronecker factors are computed on CPUs by separate workers from a
snapshot of the factors, while the training rank keeps preconditioning with the newest
completed result, because the curvature changes slowly.

The generic executor (:mod:`secondorder.distributed.workers`) runs :func:`invert_factors`, a
pure function of the factor snapshot (the same :func:`~.inverse.damping_shifts` and
:func:`~.inverse.decompose_factors` as synchronous K-FAC, so on CPU the numbers are equal).

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from secondorder.distributed.workers import Job, WorkerPool, WorkersSettings, to_device
from secondorder.optim.kfac.assignment import lpt_assign
from secondorder.optim.kfac.async_stats import StatisticsWorkers
from secondorder.optim.kfac.distributed import broadcast_from_owners
from secondorder.optim.kfac.inverse import damping_shifts, decompose_factors, decomposition_keys

if TYPE_CHECKING:
    from secondorder.optim.kfac.optimizer import KFAC

__all__ = ["AsyncCurvature", "invert_factors"]

_ABSENT, _FAILED, _OK = -1.0, 0.0, 1.0


def invert_factors(inputs: dict[str, Tensor], options: dict[str, Any]) -> dict[str, Tensor]:
    """Decompose the factors ``options["items"]`` of a snapshot (pure; runs in a worker).

    Args:
        inputs: ``"L{i}.{A|G|K|Psi}"`` factors of every layer an item belongs to,
            ``"L{i}.present"`` (1: the layer has factors) and ``"damping"`` (λ, 0-d).
        options: ``items`` [(layer key, factor name)], ``layers`` {layer key: {"names",
            "has_bias", "double"}} and ``method`` (``eigen`` | ``inverse``).

    Returns:
        ``"L{i}.{Q_A|d_A|A_inv|...}"`` per item (identity where it failed or is absent),
        ``"L{i}.bias_inv"`` for doubly-factored layers with a bias (``inverse``), and
        ``"status"``: per item 1 (ok), 0 (failed: keep the previous one), −1 (no factors yet),
        then this snapshot's retries and failures.
    """
    method, items, layers = options["method"], options["items"], options["layers"]
    damping = float(inputs["damping"])
    present = {key for key in layers if float(inputs[f"{key}.present"]) > 0}
    out: dict[str, Tensor] = {}
    shifts, retry_shifts = {}, {}
    for key in present:
        info = layers[key]
        factors = {name: inputs[f"{key}.{name}"] for name in info["names"]}
        shifts[key] = damping_shifts(factors, has_bias=info["has_bias"], damping=damping)
        retry_shifts[key] = damping_shifts(factors, has_bias=info["has_bias"], damping=10 * damping)
        if info["double"] and info["has_bias"] and method == "inverse":
            dtype = factors["G"].dtype
            out[f"{key}.bias_inv"] = (1.0 / (1.0 + shifts[key]["bias"])).to(dtype)
    todo = [j for j, (key, _) in enumerate(items) if key in present]
    args = ([inputs[f"{items[j][0]}.{items[j][1]}"] for j in todo],
            [shifts[items[j][0]][items[j][1]] for j in todo],
            [retry_shifts[items[j][0]][items[j][1]] for j in todo])  # fmt: skip
    results, retries, failures = decompose_factors(*args, [None] * len(todo), method=method)
    status = [_ABSENT] * len(items)
    for j in todo:
        status[j] = _OK
    if failures:  # rare: find out which items failed, one at a time
        results, retries, failures = [], 0, 0
        for j, factor, shift, retry in zip(todo, *args, strict=True):
            result, r, f = decompose_factors([factor], [shift], [retry], [None], method=method)
            results.append(result[0])
            retries, failures = retries + r, failures + f
            status[j] = _FAILED if f else _OK
    done = dict(zip(todo, results, strict=True))
    for j, (key, name) in enumerate(items):
        factor = inputs[f"{key}.{name}"]
        n = factor.shape[0]
        identity = torch.eye(n, dtype=factor.dtype, device=factor.device)
        fill = (identity, torch.ones(n, dtype=factor.dtype, device=factor.device))
        for k, name_key in enumerate(decomposition_keys(name, method)):
            out[f"{key}.{name_key}"] = done[j][k] if j in done else fill[k]
    for key, info in layers.items():  # absent layers still fill their slot
        if info["double"] and info["has_bias"] and method == "inverse":
            out.setdefault(f"{key}.bias_inv", torch.ones((), dtype=inputs[f"{key}.G"].dtype))
    out["status"] = torch.tensor([*status, float(retries), float(failures)], dtype=torch.float64)
    return out


class AsyncCurvature:
    """The curvature workers of one :class:`~.optimizer.KFAC` (built by ``attach_workers``).

    Args:
        optimizer: the K-FAC optimizer (its layers, state, assignment and communicator).
        settings: the ``workers`` settings (``mode`` sync | async).
    """

    def __init__(self, optimizer: KFAC, settings: WorkersSettings, source: Any = None):
        if settings.mode not in ("sync", "async"):
            raise ValueError(f"Invalid workers.mode for AsyncCurvature: {settings.mode!r}")
        if settings.stats.num_processes and source is None:
            raise ValueError(
                f"workers.stats.num_processes={settings.stats.num_processes}: statistics "
                "workers rebuild the model and data from the run's config; start them through "
                "the trainer (secondorder.train) or pass attach_workers(settings, source=...)"
            )
        self.opt, self.settings = optimizer, settings
        self.stats: StatisticsWorkers | None = None
        layers = optimizer.layers
        owner = optimizer.assignment.factor_owner
        self.items = [(i, name) for i, layer in enumerate(layers)
                      for name in layer.factor_dims()]  # fmt: skip
        mine = [item for item in self.items if owner[item] == optimizer.rank]
        count = min(settings.inversion.num_processes, len(mine)) if mine else 0
        costs = [float(layers[i].factor_dims()[name] ** 3) for i, name in mine]
        process_of = lpt_assign(costs, count) if count else []
        self.job_items = [[item for item, w in zip(mine, process_of, strict=True) if w == p]
                          for p in range(count)]  # fmt: skip
        self.pool = WorkerPool(
            [self._job(items) for items in self.job_items], mode=settings.mode,
            threads=settings.inversion.threads, heartbeat_s=settings.heartbeat_s,
            max_restarts=settings.max_restarts, name="inversion",
            pin_memory=layers[0].weight.is_cuda if layers else False,
            cpus=settings.cpus,
        ).start()  # fmt: skip
        self.published = -1
        self.installed = [-1] * count
        self.shared_installed = -1  # per-factor ownership on several ranks: the agreed version
        self.waits = self.fallbacks = 0
        self._inputs: dict[str, Tensor] = {}
        if settings.stats.num_processes:
            try:
                self.stats = StatisticsWorkers(optimizer, settings, source)
            except BaseException:
                self.pool.close()
                raise

    def _job(self, items: list[tuple[int, str]]) -> Job:
        layers, method = self.opt.layers, self.opt.inverse_method
        dtype = layers[0].weight.dtype
        involved = sorted({i for i, _ in items})
        info = {f"L{i}": {"names": list(layers[i].factor_dims()),
                          "has_bias": layers[i].has_bias,
                          "double": layers[i].double_shape is not None}
                for i in involved}  # fmt: skip
        inputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"damping": ((), torch.float64)}
        outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "status": ((len(items) + 2,), torch.float64)
        }
        for i in involved:
            inputs[f"L{i}.present"] = ((), torch.float64)
            for name, n in layers[i].factor_dims().items():
                inputs[f"L{i}.{name}"] = ((n, n), dtype)
            if info[f"L{i}"]["double"] and layers[i].has_bias and method == "inverse":
                outputs[f"L{i}.bias_inv"] = ((), dtype)
        for i, name in items:
            n = layers[i].factor_dims()[name]
            for key in decomposition_keys(name, method):
                outputs[f"L{i}.{key}"] = ((n, n) if key.startswith("Q_") or key.endswith("_inv")
                                          else (n,), dtype)  # fmt: skip
        options = {"items": [(f"L{i}", name) for i, name in items], "layers": info,
                   "method": method}  # fmt: skip
        return Job(invert_factors, inputs, outputs, options)

    # -- one step -------------------------------------------------------------------------------

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
        shared = self._shares_results()
        late = pending or (shared and self.shared_installed < self.published)
        staleness = k - self.published + 1 if late else 0
        results: dict[int, dict[str, Tensor]] = {}
        if late and (staleness > self.settings.max_staleness or missing):
            self.waits += 1
            for j in pending:
                if not self.pool.wait(j, self.published, timeout_s=self.settings.wait_timeout_s):
                    self.fallbacks += 1
                    results[j] = self.pool.compute_inline(j, self._inputs)
                    self.installed[j] = self.published
            staleness = 0
        for j in range(len(self.installed)):
            newer = max(done[j], self.pool.completed_version(j)) > self.installed[j]
            if j not in results and newer:
                newest = self.pool.newest(j)
                if newest is not None:
                    self.installed[j], results[j] = newest[0], newest[1]
        changed, retries, failures = self._install(results, shared=shared)
        self.opt.diagnostics.update(
            inverse_staleness=staleness, inverse_waits=self.waits,
            inverse_fallbacks=self.fallbacks, worker_restarts=self.pool.restarts,
            worker_utilisation=self.pool.utilisation(), worker_errors=self.pool.errors(),
        )  # fmt: skip
        if self.stats is not None:
            self.opt.diagnostics.update(self.stats.diagnostics(k))
            self.opt.diagnostics["worker_restarts"] += self.stats.pool.restarts
        return changed, retries, failures

    def _shares_results(self) -> bool:
        return self.opt.world_size > 1 and self.opt.assignment.layer_owner is None

    def _publish(self, k: int) -> None:
        """Snapshot the factors (identity + ``present = 0`` for a layer not yet run)."""
        inputs: dict[str, Tensor] = {}
        inputs["damping"] = torch.tensor(self.opt.damping, dtype=torch.float64)
        for i, layer in enumerate(self.opt.layers):
            state = self.opt.state[layer.weight]
            present = "G" in state
            inputs[f"L{i}.present"] = torch.tensor(float(present), dtype=torch.float64)
            for name, n in layer.factor_dims().items():
                inputs[f"L{i}.{name}"] = state[name] if present else torch.eye(n).to(layer.weight)
        self.pool.publish(inputs, k)
        self.published = k
        if self.pool.mode == "async":  # kept for an in-process fallback after a timed-out wait
            self._inputs = {key: t.detach().clone() for key, t in inputs.items()}

    def _install(self, results: dict[int, dict[str, Tensor]], *, shared: bool
                 ) -> tuple[bool, int, int]:  # fmt: skip
        layers, state, method = self.opt.layers, self.opt.state, self.opt.inverse_method
        device = layers[0].weight.device if layers else torch.device("cpu")
        retries = failures = 0
        local: dict[tuple[int, str], list[Tensor]] = {}
        for j, out in results.items():
            status = out["status"].tolist()
            retries, failures = retries + int(status[-2]), failures + int(status[-1])
            for (i, name), flag in zip(self.job_items[j], status, strict=False):
                layer_state = state[layers[i].weight]
                keys = decomposition_keys(name, method)
                if flag == _ABSENT:
                    continue
                if flag == _FAILED and all(k in layer_state for k in keys):  # keep the previous
                    if shared:  # ... which its owner still has to send
                        local[(i, name)] = [layer_state[k] for k in keys]
                    continue
                local[(i, name)] = [to_device(out[f"L{i}.{key}"], device) for key in keys]
                if f"L{i}.bias_inv" in out:
                    layer_state["bias_inv"] = to_device(out[f"L{i}.bias_inv"], device)
        if shared:
            return self._share(local), retries, failures
        for (i, name), tensors in local.items():
            layer_state = state[layers[i].weight]
            for key, tensor in zip(decomposition_keys(name, method), tensors, strict=True):
                layer_state[key] = tensor
        return bool(local), retries, failures

    def _share(self, local: dict[tuple[int, str], list[Tensor]]) -> bool:
        """Per-factor ownership on several ranks: once every rank holds the published version,
        all install it together, results broadcast from their owners."""
        if self.shared_installed >= self.published:
            return False
        self._pending_local = getattr(self, "_pending_local", {})
        self._pending_local.update(local)
        ready = all(v >= self.published for v in self.installed)
        flag = torch.tensor([1.0 if ready else 0.0], dtype=torch.float64)
        self.opt.comm.all_reduce(flag, op="sum")
        if int(flag.item()) < self.opt.world_size:
            return False
        layers, state, method = self.opt.layers, self.opt.state, self.opt.inverse_method
        present = [(i, name) for i, name in self.items if "G" in state[layers[i].weight]]
        owner = self.opt.assignment.factor_owner
        mine = {j: self._pending_local[item] for j, item in enumerate(present)
                if owner[item] == self.opt.rank and item in self._pending_local}  # fmt: skip
        if any(owner[item] == self.opt.rank and j not in mine for j, item in enumerate(present)):
            raise AssertionError("a published factor of this rank has no decomposition")
        shapes = []
        for i, name in present:
            n = layers[i].factor_dims()[name]
            shapes.append([torch.Size([n, n]), torch.Size([n])][: 2 if method == "eigen" else 1])
        weight = layers[0].weight
        received = broadcast_from_owners(
            self.opt.comm, [owner[item] for item in present], mine, shapes,
            dtype=weight.dtype, device=weight.device,
        )  # fmt: skip
        for (i, name), tensors in zip(present, received, strict=True):
            for key, tensor in zip(decomposition_keys(name, method), tensors, strict=True):
                state[layers[i].weight][key] = tensor.clone()
        self.shared_installed = self.published
        self._pending_local = {}
        return True

    # -- checkpoints and shutdown ---------------------------------------------------------------

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
        if self.opt.curvature_workers is self:
            self.opt.curvature_workers = None
