"""Matrix-free Newton: Newton-CG (Hessian) and Gauss-Newton CG (GGN), data-parallel.

Implements the Newton-CG of Reiz, Neckel & Bungartz 2022, "Training Large-Scale Neural Networks
with a Newton Conjugate Gradient Method" (their NEWTON-CG box), which is experiment 3 of Wang &
Huang 2023, "Second-order optimization made practical for deep learning" (Hessian-free Newton,
HVP + CG), and its Gauss-Newton form, their experiment 4 (GGN products, Schraudolph 2002), with
the Hessian-free machinery of Martens 2010, "Deep learning via Hessian-free optimization".

One step (symbols: ``θ`` flattened parameters, ``g`` gradient, ``C`` the curvature — ``H`` for
:class:`NewtonCG`, ``G = JᵀH_LJ`` for :class:`GaussNewtonCG` —, ``λ`` Tikhonov damping (the
poster's ``τ``), ``d`` direction, ``t`` step length, ``c₁`` Armijo constant, ``ρ`` reduction
ratio, ``q(s) = gᵀs + ½ sᵀCs`` the quadratic model)::

    L, g  = closure()                                   # forward/backward, g all-reduced
    d     = CG((C + λI), −g, x0 = decay · d_prev)       # NEWTON-CG line 5 (cg.py)
    if gᵀd ≥ 0: d = −g                                  # NEWTON-CG line 6 (``fallback``)
    t     = lr, halved until L(θ + t d) ≤ L + c₁ t gᵀd  # Armijo check (or fixed t = lr)
    θ     = θ + t d
    ρ     = (L(θ + t d) − L) / q(t d)                   # Levenberg-Marquardt (Martens Sec. 4.1)
    λ     = λ·3/2 if ρ < 1/4;  λ·2/3 if ρ > 3/4;  clipped to [min_damping, max_damping]

If the Armijo search fails ``max_line_search`` times the step is rejected (``θ`` unchanged,
``ρ = 0``). The predicted reduction uses the *undamped* model; ``dᵀCd`` comes from CG's own
``φ(d) = ½ dᵀ(C + λI)d + gᵀd`` with no extra product (one extra product for the fallback
direction or for ``cg_mode="local"``). With ``cg_backtracking`` the CG iterates stored at
``⌈1.3^j⌉`` are tried on the loss from the last backwards while it keeps decreasing (Martens
Sec. 4.6) before the line search (:mod:`secondorder.optim.line_search`).

Data parallelism (DDP cannot double-backward): the closure all-reduces ``g``; with
``cg_mode="global"`` each curvature product is all-reduced (exact: every rank runs the same CG
on the global curvature batch, so the scalars and the step agree across ranks); with
``cg_mode="local"`` each rank solves on its own curvature batch and the directions are averaged
(one all-reduce per step). The communicator counts the bytes (``comm.stats``); the trainer
records them per step as ``comm_bytes``.

Launch (``configs/optimizer/newton_cg.yaml``, ``ggn_cg.yaml``)::

    torchrun --standalone --nproc_per_node=2 -m secondorder.train optimizer=ggn_cg
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from secondorder.optim.cg import conjugate_gradient, martens_preconditioner
from secondorder.optim.curvature import (
    DEFAULT_HVP_MODE,
    HVP_MODES,
    Batch,
    CurvatureKind,
    CurvatureOperator,
    HvpMode,
    all_reduce_vectors,
    curvature_batches,
    empirical_fisher_diagonal,
)
from secondorder.optim.flat import (
    Params,
    flat_gradient,
    flatten,
    params_by_name,
    single_group_parameters,
    split_like,
)
from secondorder.optim.global_state import GlobalStateOptimizer
from secondorder.optim.line_search import NewtonStep, step_length
from secondorder.optim.losses import LossKind
from secondorder.optim.newton import check_loss_kind, check_positive

__all__ = ["GaussNewtonCG", "NewtonCG"]

CGMode = Literal["global", "local"]


class NewtonCG(GlobalStateOptimizer):
    """Newton-CG with Hessian-vector products (module docstring has the algorithm).

    State: per parameter ``cg_warm_start`` (the last CG solution); ``λ`` is
    ``param_groups[0]["damping"]``, adapted in place; the step count is in ``global_state``
    (:mod:`secondorder.optim.global_state`).

    Args:
        params: the model's parameters (one group).
        model: the network.
        loss_kind: the loss (defines the GGN for :class:`GaussNewtonCG`).
        comm: communicator (``None``: one process).
        lr: step length ``t`` (with ``line_search``: the first trial step).
        damping: initial ``λ``.
        adapt_damping: Levenberg-Marquardt adaptation of ``λ`` from ``ρ``.
        min_damping, max_damping: bounds of ``λ``.
        line_search: Armijo backtracking (``False``: fixed ``t = lr``).
        max_line_search: Armijo tries (halving ``t``) before the step is rejected.
        armijo_c1: ``c₁``.
        cg_max_iters, cg_tol, cg_progress_eps: CG cap, residual tolerance, Martens' ``ε``.
        cg_warm_start_decay: ``x0 = decay · d_prev`` (0 disables the warm start).
        cg_preconditioner: Martens' ``(diag(F̂) + λ)^0.75`` preconditioner.
        cg_backtracking: Martens' CG-iterate backtracking on the loss.
        curvature_batch_fraction: share of each micro-batch used for curvature products.
        cg_mode: ``global`` (exact) or ``local`` (per-rank CG, averaged directions).
        hvp_mode: Hessian product mode (:class:`NewtonCG` only).

    Raises:
        ValueError: naming a bad hyperparameter.
    """

    curvature: ClassVar[CurvatureKind] = "hessian"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        model: nn.Module,
        loss_kind: LossKind,
        comm: Any = None,
        lr: float = 1.0,
        damping: float = 1e-3,
        adapt_damping: bool = True,
        min_damping: float = 1e-8,
        max_damping: float = 1e4,
        line_search: bool = True,
        max_line_search: int = 20,
        armijo_c1: float = 1e-4,
        cg_max_iters: int = 50,
        cg_tol: float = 1e-6,
        cg_progress_eps: float | None = 5e-4,
        cg_warm_start_decay: float = 0.95,
        cg_preconditioner: bool = False,
        cg_backtracking: bool = False,
        curvature_batch_fraction: float = 1.0,
        cg_mode: CGMode = "global",
        hvp_mode: HvpMode = DEFAULT_HVP_MODE,
    ):
        defaults = dict(
            lr=lr,
            damping=damping,
            adapt_damping=adapt_damping,
            min_damping=min_damping,
            max_damping=max_damping,
            line_search=line_search,
            max_line_search=max_line_search,
            armijo_c1=armijo_c1,
            cg_max_iters=cg_max_iters,
            cg_tol=cg_tol,
            cg_progress_eps=cg_progress_eps,
            cg_warm_start_decay=cg_warm_start_decay,
            cg_preconditioner=cg_preconditioner,
            cg_backtracking=cg_backtracking,
            curvature_batch_fraction=curvature_batch_fraction,
            cg_mode=cg_mode,
            hvp_mode=hvp_mode,
        )
        _validate(defaults)
        check_loss_kind(loss_kind)
        super().__init__(params, defaults)
        self.init_global_state()
        self.ordered = single_group_parameters(self, model)
        self.model, self.loss_kind, self.comm = model, loss_kind, comm
        self.diagnostics: dict[str, float | Tensor] = {}

    # -- state ------------------------------------------------------------------------------------

    def _warm_start(self) -> Tensor | None:
        pieces = [self.state[p].get("cg_warm_start") for p in self.ordered]
        if any(piece is None for piece in pieces):
            return None
        return flatten(pieces)

    def _store_warm_start(self, flat: Tensor) -> None:
        for p, piece in zip(self.ordered, split_like(flat, self.ordered), strict=True):
            self.state[p]["cg_warm_start"] = piece.clone()

    # -- one step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any) -> Tensor:  # type: ignore[override]
        """One Newton-CG step; ``closure`` is a :class:`~secondorder.optim.BatchClosure`."""
        if closure is None:
            raise ValueError(f"{type(self).__name__} needs the closure (curvature products)")
        group = self.param_groups[0]
        with torch.enable_grad():
            loss = closure()  # L, g (g all-reduced)
        lam = float(group["damping"])
        world = self.comm.world_size if self.comm is not None else 1
        started = time.perf_counter()
        with torch.enable_grad():
            step = self._direction(closure, group, lam, world)  # CG, fallback
        time_curvature = time.perf_counter() - started
        loss0 = float(loss)
        t, new_loss = step_length(self.ordered, closure, group, step, loss0)
        # Levenberg-Marquardt: ρ = actual / predicted reduction, q(t d) = t gᵀd + ½ t² dᵀCd.
        predicted = t * step.gd + 0.5 * t * t * step.d_cd
        rho = math.nan  # undefined: no evaluation (fixed lr, no adaptation) or q ≥ 0
        if new_loss is not None and predicted < 0:
            rho = (new_loss - loss0) / predicted
        elif t == 0.0:
            rho = 0.0  # every Armijo try failed
        if group["adapt_damping"] and not math.isnan(rho):
            group["damping"] = _levenberg_marquardt(lam, rho, group)
        self.global_state["step"] += 1
        self.diagnostics = {
            "cg_iters": float(step.cg.iterations),
            "cg_rel_residual": step.cg.relative_residual,
            "cg_negative_curvature": float(step.cg.reason == "negative_curvature"),
            "rho": rho,
            "damping": lam,
            "step_size": t,
            "line_search_tries": float(step.tries if group["line_search"] else 0),
            "fallback": float(step.fallback),
            "time_curvature_s": time_curvature,
        }
        return loss

    def _direction(self, closure: Any, group: dict[str, Any], lam: float, world: int) -> NewtonStep:
        """NEWTON-CG lines 5-6: ``d = CG(C + λI, −g)``, or ``−g`` if ``gᵀd ≥ 0``; and ``dᵀCd``."""
        is_global = group["cg_mode"] == "global" or world == 1
        g = flat_gradient(self.ordered)
        batches = curvature_batches(closure.micro_batches, group["curvature_batch_fraction"])
        named = params_by_name(self.model, self.ordered)
        op = CurvatureOperator(
            model=self.model,
            params=named,
            batches=batches,
            loss_kind=self.loss_kind,
            curvature=self.curvature,
            hvp_mode=group["hvp_mode"],
            comm=self.comm if is_global else None,
        )
        preconditioner = None
        if group["cg_preconditioner"]:
            preconditioner = self._preconditioner(named, batches, lam, is_global)
        warm, decay = self._warm_start(), group["cg_warm_start_decay"]
        result = conjugate_gradient(
            op.matvec,
            -g,
            damping=lam,
            x0=warm * decay if warm is not None and decay else None,
            max_iters=group["cg_max_iters"],
            tol=group["cg_tol"],
            progress_eps=group["cg_progress_eps"],
            preconditioner=preconditioner,
            store_iterates=group["cg_backtracking"] and is_global,
        )
        d = result.solution
        if not is_global:  # local CG: average the directions
            all_reduce_vectors([d], self.comm)
        self._store_warm_start(result.final if is_global else d)
        gd = float(g @ d)
        fallback = not gd < 0.0  # also catches NaN
        if fallback:
            d, gd = -g, -float(g @ g)
        if fallback or not is_global:  # dᵀCd by one product (global C: local products averaged)
            d_cd_t = torch.dot(d, op.local_matvec(d)).reshape(1)
            all_reduce_vectors([d_cd_t], self.comm)
            d_cd = float(d_cd_t)
        else:  # from CG's φ(d) = ½ dᵀ(C + λI)d + gᵀd: no product
            d_cd = 2.0 * (result.model_value - gd) - lam * float(d @ d)
        return NewtonStep(g, d, gd, d_cd, lam, result, fallback)

    def _preconditioner(
        self, named: Params, batches: list[Batch], lam: float, is_global: bool
    ) -> Tensor:
        """Martens' ``(diag(F̂) + λ)^0.75`` on the global curvature batch."""
        diag = empirical_fisher_diagonal(self.model, named, batches, self.loss_kind)
        if is_global:
            all_reduce_vectors([diag], self.comm)
        return martens_preconditioner(diag, lam)


def _levenberg_marquardt(lam: float, rho: float, group: dict[str, Any]) -> float:
    """Martens 2010, Sec. 4.1: ``λ·3/2`` if ``ρ < 1/4``, ``λ·2/3`` if ``ρ > 3/4``, clipped."""
    lam_next = lam * 1.5 if rho < 0.25 else lam * (2.0 / 3.0) if rho > 0.75 else lam
    return min(max(lam_next, group["min_damping"]), group["max_damping"])


def _validate(group: dict[str, Any]) -> None:
    """Check the hyperparameters; the message names the bad value."""
    for key in ("lr", "min_damping", "cg_tol"):
        check_positive(key, group[key], allow_zero=True)
    for key in ("max_line_search", "cg_max_iters"):
        check_positive(key, group[key])
    damping, low, high = group["damping"], group["min_damping"], group["max_damping"]
    if not low <= damping <= high:
        raise ValueError(
            f"Invalid damping: {damping} (need min_damping={low} <= damping <= max_damping={high})"
        )
    if not 0.0 < group["armijo_c1"] < 1.0:
        raise ValueError(f"Invalid armijo_c1: {group['armijo_c1']}")
    if group["cg_progress_eps"] is not None:
        check_positive("cg_progress_eps", group["cg_progress_eps"])
    if not 0.0 <= group["cg_warm_start_decay"] <= 1.0:
        raise ValueError(f"Invalid cg_warm_start_decay: {group['cg_warm_start_decay']}")
    fraction = group["curvature_batch_fraction"]
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"Invalid curvature_batch_fraction: {fraction}")
    if group["cg_mode"] not in ("global", "local"):
        raise ValueError(f"Invalid cg_mode: {group['cg_mode']!r}; choose global or local")
    if group["hvp_mode"] not in HVP_MODES:
        raise ValueError(f"Invalid hvp_mode: {group['hvp_mode']!r}; choose one of {HVP_MODES}")
    for key in ("adapt_damping", "line_search", "cg_preconditioner", "cg_backtracking"):
        if not isinstance(group[key], bool):
            raise ValueError(f"Invalid {key}: {group[key]!r} (need a bool)")


class GaussNewtonCG(NewtonCG):
    """Gauss-Newton CG: :class:`NewtonCG` with ``G v = Jᵀ H_L J v`` (Wang & Huang 2023, exp. 4).

    ``G`` is positive semi-definite, so with ``λ > 0`` CG meets no negative curvature and the
    ``−g`` fallback only guards round-off. ``hvp_mode`` is ignored. Same arguments as
    :class:`NewtonCG`.
    """

    curvature: ClassVar[CurvatureKind] = "ggn"
