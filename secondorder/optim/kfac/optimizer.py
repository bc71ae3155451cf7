"""K-FAC and synchronous distributed K-FAC as one ``torch.optim.Optimizer``.

Papers: Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature" (K-FAC); Grosse & Martens 2016, "A Kronecker-factored approximate Fisher matrix for
convolution layers" (KFC); Ba, Grosse & Martens 2017, "Distributed Second-Order Optimization
using Kronecker-Factored Approximations"; Pauloski et al. 2021 (KAISA, ``grad_worker_fraction``).

One step ``k`` (the algorithm box; symbols below)::

    1  loss = closure()                         # forward/backward, gradients averaged over ranks
       if k % factor_update_every == 0:         # hooks active during the closure (capture.py)
    2      A_b, G_b ← batch statistics (true Fisher: one sampled backward), summed over ranks
    3      A ← β A + (1 − β) A_b,  G ← β G + (1 − β) G_b          (first update: A ← A_b)
       if k % inverse_update_every == 0:
    4      each rank decomposes its LPT-assigned factors in float64; owners broadcast (inverse.py)
    5  ∇ ← ∇h + η θ                             # coupled L2 weight decay
    6  V ← (F̂ + λ)⁻¹ ∇ per layer (precondition.py); other params: ∇ or diag-Adam ∇/(√v̂ + ε)
    7  ν ← min(1, √(κ / (Σ_p lr_p² ⟨V_p, ∇_p⟩)))   # KL-clipping (Ba et al.; update.py)
    8  m ← μ m + ν V;  θ ← θ − lr m              # heavy ball on the final update (update.py)
    9  every T steps: λ ← Levenberg–Marquardt(ρ) (damping.py)

Symbols: ``A``/``G`` Kronecker factors, ``β`` factor_decay, ``λ`` damping, ``π`` its split
between factors, ``η`` weight_decay, ``κ`` kl_clip, ``ν`` the KL-clip scale, ``μ`` momentum,
``m`` momentum buffer, ``ρ`` reduction ratio, ``T`` damping_adapt_every.

Safety: if ``Σ ⟨V, ∇⟩`` is not finite (a NaN/inf anywhere in ``V`` or ``∇``), the step is skipped
on the device (no host sync): parameters and momentum stay as they were and ``skipped_steps``
counts it. Factor updates whose batch statistics are not finite are skipped the same way.

Use::

    opt = KFAC(model.parameters(), model=model, loss_kind="cross_entropy", lr=0.1)
    closure = BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy")
    loss = opt.step(closure)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from secondorder.optim.kfac import damping as lm
from secondorder.optim.kfac.assignment import build_assignment
from secondorder.optim.kfac.capture import FactorCapture
from secondorder.optim.kfac.distributed import broadcast_from_owners
from secondorder.optim.kfac.factors import update_factors
from secondorder.optim.kfac.inverse import decompositions_missing, refresh_decompositions
from secondorder.optim.kfac.layers import find_layers
from secondorder.optim.kfac.precondition import (
    precondition,
    precondition_others,
    precondition_stacked,
    stack_layer_groups,
)
from secondorder.optim.kfac.update import Chunk, FlatUpdate
from secondorder.optim.kfac.validation import (
    FisherType,
    InverseMethod,
    OtherPreconditioner,
    Schedule,
    due,
    validate_kfac,
)

__all__ = ["KFAC"]


class KFAC(Optimizer):
    """K-FAC with factored Tikhonov damping, KL-clipping and synchronous distribution.

    Args:
        params: parameters (or groups) to optimize; per-group ``lr``, ``momentum`` and
            ``weight_decay`` are honoured, the other hyperparameters are global.
        model: the network (hooks find its ``Linear``/``Conv1d``/``Conv2d`` layers).
        loss_kind: ``cross_entropy`` | ``mse`` | ``bernoulli``: the closure's loss.
        comm: communicator (``None``: one process).
        lr: learning rate.
        momentum: heavy-ball momentum ``μ`` on the final update.
        damping: initial ``λ``.
        factor_decay: running-average decay ``β`` of ``A`` and ``G``.
        factor_update_every: steps between factor updates (int or ``step -> int``).
        inverse_update_every: steps between decompositions (int or ``step -> int``).
        inverse_method: ``"eigen"`` (λ added in the eigenbasis at every step) or ``"inverse"``
            (factored damping with π, baked in at decomposition time).
        fisher_type: ``"true"`` (sampled targets) or ``"empirical"`` (the real targets).
        kl_clip: ``κ``, or ``None`` for no clipping.
        weight_decay: coupled L2 ``η`` added to the gradient before preconditioning.
        levenberg_marquardt: adapt ``λ`` by the reduction ratio (needs ``closure.evaluate``).
        damping_adapt_every: ``T`` of the adaptation.
        double_factor_threshold: layers whose ``A`` factor is larger than this (input features,
            plus one with a bias) are doubly factored.
        exclude: fnmatch/regex module-name patterns left to the "other" path.
        other_preconditioner: ``"none"`` (plain gradient) or ``"adam"`` for non-K-FAC params.
        grad_worker_fraction: ``1.0`` or ``1/world_size`` (see :mod:`.assignment`).
        seed: seed of the sampling generator.
        bucket_mb: bucket size of the factor all-reduce.

    Diagnostics (``self.diagnostics``, read by the trainer at log steps): ``damping`` (λ),
    ``kl_clip_scale`` (ν, 0-d tensor), ``time_factors_s`` / ``time_inverse_s`` /
    ``time_precondition_s`` (this step's host wall-clock seconds; on CUDA, kernels still queued
    are not waited for, so use ``torch.profiler`` for device time), ``inverse_retries`` /
    ``inverse_failures`` (totals over ranks, refreshed at scheduled inverse steps),
    ``skipped_steps`` (0-d tensor) and ``rho`` (last reduction ratio, with Levenberg–Marquardt).

    Raises:
        ValueError: an invalid hyperparameter (the message names the value), or
            ``fisher_type="true"`` with a loss kind that has no sampler.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        model: nn.Module,
        loss_kind: str,
        comm: Any = None,
        lr: float,
        momentum: float = 0.9,
        damping: float = 1e-2,
        factor_decay: float = 0.95,
        factor_update_every: Schedule = 10,
        inverse_update_every: Schedule = 100,
        inverse_method: InverseMethod = "eigen",
        fisher_type: FisherType = "true",
        kl_clip: float | None = 1e-3,
        weight_decay: float = 0.0,
        levenberg_marquardt: bool = False,
        damping_adapt_every: int = 5,
        double_factor_threshold: int = 4096,
        exclude: Sequence[str] = (),
        other_preconditioner: OtherPreconditioner = "none",
        grad_worker_fraction: float = 1.0,
        seed: int = 0,
        bucket_mb: float = 25.0,
    ):
        world = 1 if comm is None else comm.world_size
        validate_kfac(locals(), world)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
                        factor_decay=factor_decay, kl_clip=kl_clip)  # fmt: skip
        super().__init__(params, defaults)
        self.model, self.loss_kind, self.comm = model, loss_kind, comm
        self.factor_update_every = factor_update_every
        self.inverse_update_every = inverse_update_every
        self.inverse_method, self.fisher_type = inverse_method, fisher_type
        self.levenberg_marquardt = levenberg_marquardt
        self.damping_adapt_every = damping_adapt_every
        self.other_preconditioner, self.seed, self.bucket_mb = other_preconditioner, seed, bucket_mb
        self.rank, self.world_size = (0 if comm is None else comm.rank), world
        everything = [p for group in self.param_groups for p in group["params"]]
        self.layer_options = {"exclude": list(exclude),
                              "double_factor_threshold": double_factor_threshold}  # fmt: skip
        self.layers = find_layers(model, everything, **self.layer_options)
        self.memory_optimal = world > 1 and max(1, round(grad_worker_fraction * world)) == 1
        self.assignment = build_assignment(self.layers, world_size=world,
                                           memory_optimal=self.memory_optimal)  # fmt: skip
        covered = [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None]
        self._covered = {id(p) for p in covered}
        self._steps, self._retries, self._failures = 0, 0, 0
        self._flat_update = FlatUpdate()
        self._maybe_missing = True
        self._groups: list[tuple[list[int], dict[str, Tensor]]] | None = None
        device = everything[0].device if everything else torch.device("cpu")
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        # Issue 7: set by attach_workers (async_curvature.AsyncCurvature); None: in-process.
        self.curvature_workers: Any = None
        self.diagnostics: dict[str, float | Tensor] = {
            "damping": damping, "kl_clip_scale": 1.0, "time_factors_s": 0.0,
            "time_inverse_s": 0.0, "time_precondition_s": 0.0, "inverse_retries": 0,
            "inverse_failures": 0, "skipped_steps": self._skipped,
        }  # fmt: skip

    @property
    def damping(self) -> float:
        return float(self.param_groups[0]["damping"])

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One K-FAC step (the algorithm box in the module docstring); returns the loss."""
        if closure is None:
            raise ValueError("KFAC.step needs a closure (see secondorder.optim.closure)")
        if self.levenberg_marquardt and not callable(getattr(closure, "evaluate", None)):
            raise ValueError("levenberg_marquardt=True needs a closure with evaluate()")
        k = self._steps
        self._check_generator_device()
        scheduled_inverse = due(self.inverse_update_every, k, "inverse_update_every")
        scale = getattr(getattr(closure, "loss_scaler", None), "scale", 1.0)
        timing = {"time_factors_s": 0.0, "time_inverse_s": 0.0}
        factor_step = due(self.factor_update_every, k, "factor_update_every")
        stats = getattr(self.curvature_workers, "stats", None)
        if stats is not None:  # statistics workers: refresh their parameters, take results
            stats.before_step(k)
            if factor_step:  # fold the workers' statistics: no forward/backward here
                start = time.perf_counter()
                update_factors(self.layers, self.state, stats.take(), comm=self.comm,
                               factor_decay=self.param_groups[0]["factor_decay"],
                               bucket_mb=self.bucket_mb)  # fmt: skip
                timing["time_factors_s"] = time.perf_counter() - start
                self._maybe_missing = True
        if factor_step and stats is None:
            capture = FactorCapture(
                self.layers, self.model, fisher_type=self.fisher_type, loss_kind=self.loss_kind,
                generator=self._generator, rank=self.rank, world_size=self.world_size,
            )  # fmt: skip
            with capture, torch.enable_grad():
                loss = closure()
            start = time.perf_counter()
            capture.finish(grad_scale=float(scale))
            update_factors(self.layers, self.state, capture, comm=self.comm,
                           factor_decay=self.param_groups[0]["factor_decay"],
                           bucket_mb=self.bucket_mb)  # fmt: skip
            timing["time_factors_s"] = capture.seconds + time.perf_counter() - start
            self._maybe_missing = True
        else:
            with torch.enable_grad():
                loss = closure()
        # A layer can only lack a decomposition after a factor update or a load.
        missing = self._maybe_missing and decompositions_missing(
            self.layers, self.state, self.assignment, rank=self.rank, method=self.inverse_method
        )
        self._maybe_missing = False
        if self.curvature_workers is not None:  # decompositions from workers
            start = time.perf_counter()
            changed, retries, failures = self.curvature_workers.update(
                k, publish=scheduled_inverse or missing, missing=missing
            )
            self._count_inverse_results(retries, failures, exchange_counts=scheduled_inverse)
            if changed:
                self._groups = None
            timing["time_inverse_s"] = time.perf_counter() - start
        elif scheduled_inverse or missing:
            start = time.perf_counter()
            self._update_inverses(exchange_counts=scheduled_inverse)
            timing["time_inverse_s"] = time.perf_counter() - start
        start = time.perf_counter()
        adapt = self.levenberg_marquardt and (k + 1) % self.damping_adapt_every == 0
        grads, deltas = self._update(keep_deltas=adapt)
        timing["time_precondition_s"] = time.perf_counter() - start
        if adapt:
            self._adapt_damping(closure, loss, grads, deltas)
        self._steps += 1
        self.diagnostics.update(timing, damping=self.damping)
        return loss

    def _check_generator_device(self) -> None:
        if not self.layers or self._generator.device == self.layers[0].weight.device:
            return
        # The model moved after construction: a fresh stream on its device, seeded from
        # (seed, step) so that it stays reproducible.
        device = self.layers[0].weight.device
        self._generator = torch.Generator(device=device).manual_seed(self.seed + self._steps)
        self._skipped = self._skipped.to(device)
        self.diagnostics["skipped_steps"] = self._skipped

    # -- decompositions (step 4) ----------------------------------------------------------------

    def _owned_layer(self, index: int) -> bool:
        owner = self.assignment.layer_owner
        return owner is None or owner[index] == self.rank

    def _update_inverses(self, *, exchange_counts: bool) -> None:
        retries, failures = refresh_decompositions(
            self.layers, self.state, self.assignment, rank=self.rank, comm=self.comm,
            method=self.inverse_method, damping=self.damping,
        )  # fmt: skip
        self._groups = None
        self._count_inverse_results(retries, failures, exchange_counts=exchange_counts)

    def _count_inverse_results(self, retries: int, failures: int, *, exchange_counts: bool) -> None:
        self._retries += retries
        self._failures += failures
        if exchange_counts:  # every rank is here at scheduled inverse steps
            totals = torch.tensor([float(self._retries), float(self._failures)],
                                  dtype=torch.float64, device=self._skipped.device)  # fmt: skip
            if self.comm is not None:
                self.comm.all_reduce(totals, op="sum")
            retries_total, failures_total = totals.tolist()
            self.diagnostics["inverse_retries"] = int(retries_total)
            self.diagnostics["inverse_failures"] = int(failures_total)

    def attach_workers(self, settings: Any, source: Any = None) -> Any:
        """Hand step 4 (and, with ``settings.stats.num_processes > 0``, steps 2-3's statistics)
        to curvature workers (``settings``: a ``WorkersSettings``; ``source``: a
        :class:`~secondorder.trainer.stats_source.StatsSource`, needed by statistics workers).

        Returns the :class:`~.async_curvature.AsyncCurvature`; its ``close()`` stops the
        workers and brings back the in-process computations.
        """
        from secondorder.optim.kfac.async_curvature import AsyncCurvature

        if self.curvature_workers is not None:
            self.curvature_workers.close()
        self.curvature_workers = AsyncCurvature(self, settings, source=source)
        return self.curvature_workers

    # -- preconditioning and the update (steps 5-8) ---------------------------------------------

    def _update(self, *, keep_deltas: bool) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        grads: dict[int, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    wd = group["weight_decay"]
                    grads[id(p)] = p.grad.add(p, alpha=wd) if wd else p.grad
        chunks = self._precondition(grads) + precondition_others(
            self.param_groups, self.state, grads, covered=self._covered,
            method=self.other_preconditioner, step=self._steps + 1,
        )  # fmt: skip
        nu, ok, deltas = self._flat_update.apply(
            self.param_groups, self.state, chunks,
            kl_clip=self.param_groups[0]["kl_clip"], keep_deltas=keep_deltas,
        )  # fmt: skip
        self._skipped += (~ok).to(self._skipped.device, torch.int64)
        self.diagnostics["kl_clip_scale"] = nu
        return grads, deltas

    def _layer_groups(self) -> list[tuple[list[int], dict[str, Tensor]]]:
        if self._groups is None:  # rebuilt after every decomposition refresh and load
            owned = [i for i in range(len(self.layers)) if self._owned_layer(i)]
            self._groups = stack_layer_groups(self.layers, self.state, owned, self.inverse_method)
        return self._groups

    def _precondition(self, grads: dict[int, Tensor]) -> list[Chunk]:
        """Step 6 for the K-FAC layers: one batched solve per group of equal-shape layers;
        memory-optimal: each layer's owner computes, then broadcasts."""
        method, lam = self.inverse_method, self.damping
        chunks: list[Chunk] = []
        done: set[int] = set()
        for members, stacked in [] if self.memory_optimal else self._layer_groups():
            layers = [self.layers[i] for i in members]
            params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
            if any(id(p) not in grads for p in params):
                continue  # the per-layer path below
            gw = torch.stack([grads[id(layer.weight)] for layer in layers])
            gw = gw.reshape(len(layers), layers[0].out_dim, layers[0].in_dim)
            grad = gw
            if layers[0].has_bias:
                gb = torch.stack([grads[id(layer.bias)] for layer in layers])
                grad = torch.cat([gw, gb.unsqueeze(2)], dim=2)
            result = precondition_stacked(grad, stacked, method=method, damping=lam)
            in_dim = layers[0].in_dim
            weights = [layer.weight for layer in layers]
            chunks.append(Chunk(weights, result[:, :, :in_dim].reshape(-1), gw.reshape(-1)))
            if layers[0].has_bias:
                biases = [layer.bias for layer in layers]
                chunks.append(Chunk(biases, result[:, :, in_dim].reshape(-1), gb.reshape(-1)))
            done.update(members)
        indices = [i for i, layer in enumerate(self.layers)
                   if i not in done and id(layer.weight) in grads]  # fmt: skip
        local: dict[int, list[Tensor]] = {}
        for j, i in enumerate(indices):
            if not self._owned_layer(i):
                continue
            layer, state = self.layers[i], self.state[self.layers[i].weight]
            gw = grads[id(layer.weight)]
            gb = grads.get(id(layer.bias)) if layer.bias is not None else None
            if ("Q_G" if method == "eigen" else "G_inv") in state:
                vw, vb = precondition(layer, gw, gb, state, method=method, damping=lam)
            else:  # no factors yet (layer not run at a factor step): the plain gradient
                vw = gw
                vb = gb if gb is not None or layer.bias is None else torch.zeros_like(layer.bias)
            local[j] = [vw] if vb is None else [vw, vb]
        if self.memory_optimal and indices:
            layer_owner = self.assignment.layer_owner
            assert layer_owner is not None
            shapes = [[p.shape for p in (self.layers[i].weight, self.layers[i].bias)
                       if p is not None] for i in indices]  # fmt: skip
            w = self.layers[indices[0]].weight
            received = broadcast_from_owners(self.comm, [layer_owner[i] for i in indices], local,
                                             shapes, dtype=w.dtype, device=w.device)  # fmt: skip
            local = dict(enumerate(received))
        for j, i in enumerate(indices):
            layer = self.layers[i]
            for p, v in zip((layer.weight, layer.bias), local[j], strict=False):
                if p is not None and id(p) in grads:
                    chunks.append(Chunk([p], v.reshape(-1), grads[id(p)].reshape(-1)))
        return chunks

    # -- damping adaptation (step 9) ------------------------------------------------------------

    def _adapt_damping(self, closure: Any, loss: Tensor, grads: dict, deltas: dict) -> None:
        change, predicted = lm.quadratic_model(
            self.layers, self.state, self.param_groups, grads, deltas,
            loss_before=loss, loss_after=closure.evaluate(), damping=self.damping,
        )  # fmt: skip
        rho = lm.reduction_ratio(change, predicted)
        new = lm.adapted_damping(self.damping, rho, self.damping_adapt_every)
        for group in self.param_groups:
            group["damping"] = new
        self.diagnostics["rho"] = max(rho, -1e30)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kfac"] = {
            "steps": self._steps,
            "generator": self._generator.get_state(),
            "skipped_steps": self._skipped.clone(),
            "inverse_retries": self._retries,
            "inverse_failures": self._failures,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kfac", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._steps = int(extra["steps"])
            self._check_generator_device()
            try:
                self._generator.set_state(extra["generator"].cpu())
            except RuntimeError as err:
                raise ValueError(
                    f"KFAC checkpoint: its sampling generator state does not fit a "
                    f"{self._generator.device.type} generator ({err})"
                ) from err
            self._skipped.copy_(extra["skipped_steps"])
            self._retries = int(extra["inverse_retries"])
            self._failures = int(extra["inverse_failures"])
        if self.memory_optimal:  # rank 0's checkpoint holds rank 0's layers' decompositions
            for index, layer in enumerate(self.layers):
                if not self._owned_layer(index):
                    state = self.state[layer.weight]
                    stale = [k for k in state if k.startswith(("Q_", "d_")) or k.endswith("_inv")]
                    for key in stale:
                        del state[key]
        self._groups = None
        self._flat_update.invalidate()
        self._maybe_missing = True
        if self.curvature_workers is not None:
            self.curvature_workers.after_load()
        self.diagnostics["damping"] = self.damping
        self.diagnostics["skipped_steps"] = self._skipped
