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

from secondorder.distributed.communicator import BUCKET_MB
from secondorder.optim.global_state import GlobalStateOptimizer
from secondorder.optim.kfac import damping as lm
from secondorder.optim.kfac.assignment import build_assignment
from secondorder.optim.kfac.exchange import CurvatureWorkers
from secondorder.optim.kfac.inverse import drop_others_decompositions
from secondorder.optim.kfac.kronecker import KroneckerCurvature
from secondorder.optim.kfac.layers import find_layers
from secondorder.optim.kfac.precondition import (
    precondition_groups,
    precondition_layers,
    precondition_others,
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
from secondorder.optim.weight_decay import decay_groups

__all__ = ["KFAC"]


class KFAC(KroneckerCurvature, GlobalStateOptimizer):
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
        exclude_norm_and_bias_from_weight_decay: ``η = 0`` for biases and norm-layer weights
            (their groups say so); the factors and the preconditioner do not change.
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
    ``time_precondition_s`` (host wall-clock seconds per step, averaged over the steps since the
    last :meth:`reset_diagnostics_interval`, which the trainer calls after every record; on CUDA,
    kernels still queued are not waited for, so use ``torch.profiler`` for device time),
    ``inverse_retries`` /
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
        exclude_norm_and_bias_from_weight_decay: bool = False,
        levenberg_marquardt: bool = False,
        damping_adapt_every: int = 5,
        double_factor_threshold: int = 4096,
        exclude: Sequence[str] = (),
        other_preconditioner: OtherPreconditioner = "none",
        grad_worker_fraction: float = 1.0,
        seed: int = 0,
        bucket_mb: float = BUCKET_MB,
    ):
        # Long by its signature alone: it is the schema of every K-FAC hyperparameter.
        world = 1 if comm is None else comm.world_size
        validate_kfac(locals(), world)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            damping=damping,
            factor_decay=factor_decay,
            kl_clip=kl_clip,
        )
        super().__init__(
            decay_groups(params, exclude=exclude_norm_and_bias_from_weight_decay), defaults
        )
        self.model, self.loss_kind, self.comm = model, loss_kind, comm
        self.factor_update_every = factor_update_every
        self.inverse_update_every = inverse_update_every
        self.inverse_method, self.fisher_type = inverse_method, fisher_type
        self.levenberg_marquardt = levenberg_marquardt
        self.damping_adapt_every = damping_adapt_every
        self.other_preconditioner, self.seed, self.bucket_mb = other_preconditioner, seed, bucket_mb
        self.rank, self.world_size = (0 if comm is None else comm.rank), world
        everything = [p for group in self.param_groups for p in group["params"]]
        self.layer_options = {
            "exclude": list(exclude),
            "double_factor_threshold": double_factor_threshold,
        }
        self.layers = find_layers(model, everything, **self.layer_options)
        self.memory_optimal = world > 1 and max(1, round(grad_worker_fraction * world)) == 1
        self.assignment = build_assignment(
            self.layers, world_size=world, memory_optimal=self.memory_optimal
        )
        covered = [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None]
        self._covered = {id(p) for p in covered}
        self._flat_update = FlatUpdate()
        self._maybe_missing = True
        self._groups: list[tuple[list[int], dict[str, Tensor]]] | None = None
        device = everything[0].device if everything else torch.device("cpu")
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self.init_global_state(
            inverse_retries=0,
            inverse_failures=0,
            skipped_steps=torch.zeros((), dtype=torch.int64, device=device),
        )
        # Set by attach_workers; None: factors and decompositions computed in the step.
        self.curvature_workers: CurvatureWorkers | None = None
        self.diagnostics: dict[str, float | Tensor] = {
            "damping": damping,
            "kl_clip_scale": 1.0,
            "time_factors_s": 0.0,
            "time_inverse_s": 0.0,
            "time_precondition_s": 0.0,
            "inverse_retries": 0,
            "inverse_failures": 0,
            "skipped_steps": self.global_state["skipped_steps"],
        }
        self._timing_sums: dict[str, float] = {}
        self._timing_steps = 0

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
        k = self.global_state["step"]
        self._check_generator_device()
        scheduled_inverse = due(self.inverse_update_every, k, "inverse_update_every")
        timing = {"time_factors_s": 0.0, "time_inverse_s": 0.0}
        loss = self._closure_and_factors(closure, k, timing)
        self._decompositions(k, scheduled_inverse, timing)
        start = time.perf_counter()
        adapt = self.levenberg_marquardt and (k + 1) % self.damping_adapt_every == 0
        grads, deltas = self._update(keep_deltas=adapt)
        timing["time_precondition_s"] = time.perf_counter() - start
        if adapt:
            self._adapt_damping(closure, loss, grads, deltas)
        self.global_state["step"] += 1
        self._record_timing(timing)
        self.diagnostics["damping"] = self.damping
        return loss

    def _check_generator_device(self) -> None:
        if not self.layers or self._generator.device == self.layers[0].weight.device:
            return
        # The model moved after construction: a fresh stream on its device, seeded from
        # (seed, step) so that it stays reproducible.
        device = self.layers[0].weight.device
        step = self.global_state["step"]
        self._generator = torch.Generator(device=device).manual_seed(self.seed + step)
        skipped = self.global_state["skipped_steps"].to(device)
        self.global_state["skipped_steps"] = self.diagnostics["skipped_steps"] = skipped

    # -- preconditioning and the update (steps 5-8) ---------------------------------------------

    def _update(self, *, keep_deltas: bool) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        grads: dict[int, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    wd = group["weight_decay"]
                    grads[id(p)] = p.grad.add(p, alpha=wd) if wd else p.grad
        chunks = self._precondition(grads) + precondition_others(
            self.param_groups,
            self.state,
            grads,
            covered=self._covered,
            method=self.other_preconditioner,
            step=self.global_state["step"] + 1,
        )
        nu, ok, deltas = self._flat_update.apply(
            self.param_groups,
            self.state,
            chunks,
            kl_clip=self.param_groups[0]["kl_clip"],
            keep_deltas=keep_deltas,
        )
        skipped = self.global_state["skipped_steps"]
        skipped += (~ok).to(skipped.device, torch.int64)
        self.diagnostics["kl_clip_scale"] = nu
        return grads, deltas

    def _layer_groups(self) -> list[tuple[list[int], dict[str, Tensor]]]:
        if self._groups is None:  # rebuilt after every decomposition refresh and load
            owned = [
                i for i in range(len(self.layers)) if self.assignment.preconditions(i, self.rank)
            ]
            self._groups = stack_layer_groups(self.layers, self.state, owned, self.inverse_method)
        return self._groups

    def _precondition(self, grads: dict[int, Tensor]) -> list[Chunk]:
        """Step 6 for the K-FAC layers: one batched solve per group of equal-shape layers, the
        rest one by one; memory-optimal: each layer's owner computes, then broadcasts."""
        method, lam = self.inverse_method, self.damping
        groups = [] if self.memory_optimal else self._layer_groups()
        chunks, done = precondition_groups(self.layers, groups, grads, method=method, damping=lam)
        indices = [
            i for i, layer in enumerate(self.layers) if i not in done and id(layer.weight) in grads
        ]
        return chunks + precondition_layers(
            self.layers,
            self.state,
            grads,
            indices,
            assignment=self.assignment,
            rank=self.rank,
            comm=self.comm,
            method=method,
            damping=lam,
        )

    # -- damping adaptation (step 9) ------------------------------------------------------------

    def _adapt_damping(self, closure: Any, loss: Tensor, grads: dict, deltas: dict) -> None:
        change, predicted = lm.quadratic_model(
            self.layers,
            self.state,
            self.param_groups,
            grads,
            deltas,
            loss_before=loss,
            loss_after=closure.evaluate(),
            damping=self.damping,
        )
        rho = lm.reduction_ratio(change, predicted)
        new = lm.adapted_damping(self.damping, rho, self.damping_adapt_every)
        for group in self.param_groups:
            group["damping"] = new
        self.diagnostics["rho"] = max(rho, -1e30)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The torch state plus ``global_state``: step, sampling generator, counters."""
        self.global_state["generator"] = self._generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        skipped = self.global_state["skipped_steps"]  # keep the device tensor diagnostics read
        super().load_state_dict(state_dict)
        self._check_generator_device()
        try:
            self._generator.set_state(self.global_state["generator"].cpu())
        except RuntimeError as err:
            raise ValueError(
                f"KFAC checkpoint: its sampling generator state does not fit a "
                f"{self._generator.device.type} generator ({err})"
            ) from err
        self.global_state["skipped_steps"] = skipped.copy_(self.global_state["skipped_steps"])
        if self.memory_optimal:  # rank 0's checkpoint holds rank 0's layers' decompositions
            drop_others_decompositions(self.layers, self.state, self.assignment, rank=self.rank)
        self._groups = None
        self._flat_update.invalidate()
        self._maybe_missing = True
        if self.curvature_workers is not None:
            self.curvature_workers.after_load()
        self.diagnostics["damping"] = self.damping
        self.diagnostics["skipped_steps"] = self.global_state["skipped_steps"]
