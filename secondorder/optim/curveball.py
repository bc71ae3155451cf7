"""CurveBall: one Gauss-Newton-vector product per step, amortising Newton's inverse over time.

Implements Henriques, Ehrhardt, Albanie & Vedaldi (2019), "Small Steps and Giant Leaps: Minimal
Newton Solvers for Deep Learning" (ICCV 2019, arXiv:1805.08095): Algorithm 1, with the paper's
closed-form automatic ``ρ``/``β`` and its Levenberg-Marquardt heuristic for the damping ``λ``
(constants as in the authors' reference code).

Symbols (the paper's): ``w`` the weights, ``J = ∇f̂(w)`` the gradient, ``Ĥ = G + λI`` the damped
Gauss-Newton matrix (``G = J_fᵀ H_L J_f``, ``J_f`` the network Jacobian, ``H_L`` the loss Hessian
w.r.t. the outputs), ``z`` the buffer (the running estimate of the Newton step ``-Ĥ⁻¹J``),
``Δz`` the gradient of the quadratic model w.r.t. ``z``, ``ρ`` the momentum, ``β`` the learning
rate, ``λ`` the damping.

Cost per step, fused as in the paper: one forward carrying ``J_f z`` (forward-mode dual
numbers), one backward of ``H_L J_f z + ∂L/∂f`` giving ``Gz + J`` (the gradient gets no pass of
its own), and one more forward-mode product ``J_f Δz`` for the automatic ``ρ``/``β``. Both are
:class:`~secondorder.optim.curvature.CurvatureOperator`'s (``model_gradient`` and
``local_plane_model``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from secondorder.optim.curvature import CurvatureOperator, all_reduce_vectors, mean_loss
from secondorder.optim.flat import dot, named_parameters_of
from secondorder.optim.global_state import GlobalStateOptimizer

__all__ = ["CurveBall", "adapt_damping", "solve_step_sizes"]


def solve_step_sizes(matrix: Tensor, rhs: Tensor, *, rtol: float = 1e-5) -> Tensor:
    """``[ρ, -β] = -M⁺ c``: the minimiser of the quadratic model over ``z' = ρz - βΔz``.

    With ``q(z') = ½ z'ᵀĤz' + Jᵀz'`` and ``z' = ρ z + (-β) Δz``::

        M = [[zᵀĤz,  zᵀĤΔz ],      c = [Jᵀz,
             [ΔzᵀĤz, ΔzᵀĤΔz]],          JᵀΔz]

    ``q = ½ xᵀMx + xᵀc`` for ``x = [ρ, -β]``, minimised at ``x = -M⁻¹c``. The paper (and the
    authors' code) writes the same system with the unknowns swapped:
    ``[β, -ρ]ᵀ = [[ΔzᵀĤΔz, zᵀĤΔz], [zᵀĤΔz, zᵀĤz]]⁻¹ [JᵀΔz, Jᵀz]ᵀ``.

    ``M`` is first scaled to unit diagonal (``S = D M D``, ``D = diag(M)^-½``, zero where the
    diagonal is zero), so the cut-off measures how parallel ``z`` and ``Δz`` are (in the ``Ĥ``
    metric), not how large they are. Then the explicit 2x2 pseudo-inverse: ``S⁻¹ = adj(S)/det S``
    when ``det S > rtol · (tr S / 2)²``, else ``S⁺ = S / (tr S)²`` (exact for the rank-one PSD
    matrix; 0 for ``S = 0``). This covers ``z = 0`` on the first step and ``z ∥ Δz``: the result
    is the minimum-norm minimiser in the scaled coordinates, and every minimiser gives the same
    ``z'`` there. Elementwise in float64 with ``torch.where``: no host sync, no LAPACK call.

    Args:
        matrix: ``M`` (2x2, symmetric positive semi-definite).
        rhs: ``c`` (2,).
        rtol: relative determinant cut-off of the scaled ``M``.

    Returns:
        ``x = [ρ, -β]`` in float64.
    """
    m = matrix.double()
    diagonal = m.diagonal()
    positive = diagonal > 0
    scale = torch.where(positive, diagonal.clamp_min(1e-300).rsqrt(), torch.zeros_like(diagonal))
    a, d = diagonal * scale.square()
    b = 0.5 * (m[0, 1] + m[1, 0]) * scale[0] * scale[1]
    det, trace = a * d - b * b, a + d
    invertible = det > rtol * 0.25 * trace * trace
    one = torch.ones_like(det)
    inverse = torch.stack([torch.stack([d, -b]), torch.stack([-b, a])])
    inverse = inverse / torch.where(invertible, det, one)
    rank_one = torch.stack([torch.stack([a, b]), torch.stack([b, d])])
    rank_one = rank_one / torch.where(trace > 0, trace * trace, one)
    pseudo_inverse = torch.where(invertible, inverse, rank_one)
    return -scale * (pseudo_inverse @ (scale * rhs.double()))


def adapt_damping(
    damping: Tensor,
    *,
    actual: Tensor,
    predicted: Tensor,
    low: float,
    high: float,
    factor: float,
) -> Tensor:
    """Levenberg-Marquardt rule on ``r = actual / predicted`` change of the loss.

    ``λ ← λ / ω`` if ``r < low`` (the model over-promised: trust it less), ``λ ← ω λ`` if
    ``r > high``, else unchanged; ``ω = factor < 1``. A NaN ratio (no predicted change) keeps
    ``λ``. On device.
    """
    ratio = actual / predicted
    return torch.where(
        ratio < low, damping / factor, torch.where(ratio > high, damping * factor, damping)
    )


class CurveBall(GlobalStateOptimizer):
    """CurveBall (Henriques et al. 2019, Algorithm 1) with automatic ``ρ``, ``β`` and ``λ``.

    Each step, on the closure's micro-batches (mean of equal-sized micro-batches, averaged over
    ranks)::

        Δz = Ĥz + J = G z + J + λ z                  # Algorithm 1, line 3
        [ρ, -β] = -M⁺ c  (solve_step_sizes)           # automatic ρ, β (auto_params)
        z ← ρ z - β Δz                                # line 4
        w ← w + z                                     # line 5

    and, every ``lambda_every`` steps (from step 0), ``λ`` follows :func:`adapt_damping` with
    ``predicted = q(z') = ½ xᵀMx + xᵀc`` for the ``x = [ρ, -β]`` taken, ``actual = f̂(w + z') -
    f̂(w)`` on the same batch and ``ω = lambda_factor ** lambda_every`` (the authors' code: 0.999,
    0.5, 1.5, every 5). ``f̂(w + z')`` is one forward computed like ``f̂(w)``, in the parameters'
    dtype: ``closure.evaluate`` would autocast, and its rounding would swamp the difference.

    The scalars of ``M`` and ``c`` are output-space dot products: ``zᵀGΔz = (J_f z)ᵀ H_L (J_f Δz)``
    and ``Jᵀz = (∂L/∂f)ᵀ (J_f z)``, so ``ĤΔz`` costs one forward-mode product and no backward.
    Without ``auto_params`` (fixed ``ρ = momentum``, ``β = lr``) that product is made only on the
    ``λ`` steps; with ``G`` removed and ``λ = 0``, CurveBall is exactly momentum SGD
    (``torch.optim.SGD`` with ``momentum = ρ``, ``lr = β``: its buffer is ``-z/β``).

    Data parallel: ``Gz + J`` is averaged over ranks in one bucketed all-reduce, and the five
    scalars with the loss in one all-reduce of a 6-vector; ``z`` and ``w`` then stay identical.

    The step reads ``closure.model``, ``closure.micro_batches``, ``closure.loss_kind`` and
    ``closure.comm`` (:class:`~secondorder.optim.closure.BatchClosure`) and does not call the
    closure: the fused pass above replaces its backward. Products run in the parameters' dtype
    without autocast. Train-mode batch norm: the fused forward updates the running statistics
    once per micro-batch, as a gradient step's forward does; the other passes leave them alone.

    State: per parameter ``z``; ``λ`` in ``param_groups[0]["damping"]`` as a float64 tensor on the
    parameters' device (the step never syncs with the host) and the step count in
    ``global_state`` (:mod:`secondorder.optim.global_state`). One parameter group (``ρ``, ``β``,
    ``λ`` are global).

    Args:
        params: the model's parameters (one group).
        lr: ``β`` when ``auto_params`` is false.
        momentum: ``ρ`` when ``auto_params`` is false.
        damping: initial ``λ`` (the paper's default 1).
        auto_params: choose ``ρ``, ``β`` each step by the 2x2 solve.
        auto_lambda: adapt ``λ`` every ``lambda_every`` steps.
        lambda_every: interval of the ``λ`` test.
        lambda_factor: per-step factor; ``ω = lambda_factor ** lambda_every``.
        lambda_low: decrease threshold on the ratio (``λ`` grows below it).
        lambda_high: increase threshold on the ratio (``λ`` shrinks above it).

    Raises:
        ValueError: if a hyperparameter is out of range; the message names the value.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        damping: float = 1.0,
        auto_params: bool = True,
        auto_lambda: bool = True,
        lambda_every: int = 5,
        lambda_factor: float = 0.999,
        lambda_low: float = 0.5,
        lambda_high: float = 1.5,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not damping >= 0.0:
            raise ValueError(f"Invalid damping value: {damping}")
        for name, flag in (("auto_params", auto_params), ("auto_lambda", auto_lambda)):
            if not isinstance(flag, bool):
                raise ValueError(f"Invalid {name} value: {flag!r}")
        if isinstance(lambda_every, bool) or not isinstance(lambda_every, int) or lambda_every < 1:
            raise ValueError(f"Invalid lambda_every value: {lambda_every!r}")
        if not 0.0 < lambda_factor <= 1.0:
            raise ValueError(f"Invalid lambda_factor value: {lambda_factor}")
        if not 0.0 <= lambda_low <= lambda_high:
            raise ValueError(f"Invalid lambda thresholds: low={lambda_low}, high={lambda_high}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "auto_params": auto_params,
            "auto_lambda": auto_lambda,
            "lambda_every": lambda_every,
            "lambda_factor": lambda_factor,
            "lambda_low": lambda_low,
            "lambda_high": lambda_high,
        }
        super().__init__(params, defaults)
        self.init_global_state()
        self._place_damping()
        self.diagnostics: dict[str, float | Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only one group: ``ρ``, ``β`` and ``λ`` are global to the quadratic model."""
        if self.param_groups:
            raise ValueError("CurveBall supports one parameter group (ρ, β, λ are global)")
        super().add_param_group(param_group)

    def _place_damping(self) -> None:
        """``λ`` as a float64 tensor on the parameters' device (also after a checkpoint load)."""
        group = self.param_groups[0]
        device = group["params"][0].device
        group["damping"] = torch.as_tensor(group["damping"], dtype=torch.float64).to(device)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor:
        """One CurveBall step on the closure's batch; returns the global mean loss (before it).

        Args:
            closure: a :class:`~secondorder.optim.closure.BatchClosure` (or an object with
                ``model``, ``micro_batches``, ``loss_kind`` and ``comm``).
        """
        _check_closure(closure)
        group = self.param_groups[0]
        check_damping = (
            group["auto_lambda"] and self.global_state["step"] % group["lambda_every"] == 0
        )
        op, z = self._operator(closure)
        zs = list(z.values())
        # Line 3, Δz = G z + J + λz, with G z + J fused: one forward carrying J_f z, one backward.
        deltas = list(op.model_gradient(z, update_norm_statistics=True).values())
        torch._foreach_add_(deltas, torch._foreach_mul(zs, group["damping"].to(zs[0].dtype)))
        need_model = group["auto_params"] or check_damping
        loss, quadratic = _reduce(op, z, deltas, group["damping"], need_model=need_model)
        x = _step_sizes(group, quadratic, loss)
        rho, beta = x[0], -x[1]

        # Lines 4-5: z ← ρz - βΔz, w ← w + z.
        torch._foreach_mul_(zs, rho.to(zs[0].dtype))
        torch._foreach_mul_(deltas, (-beta).to(zs[0].dtype))
        torch._foreach_add_(zs, deltas)
        torch._foreach_add_(list(op.params.values()), zs)

        self.diagnostics = {"curveball_rho": rho, "curveball_beta": beta}
        if check_damping:
            self._adapt_damping(group, op, x, quadratic, loss)
        self.diagnostics["curveball_lambda"] = group["damping"]
        self.global_state["step"] += 1
        return loss

    def _operator(self, closure: Any) -> tuple[CurvatureOperator, dict[str, Tensor]]:
        """The step's GGN operator at ``w`` (nothing cached) and the buffers ``z`` by name."""
        named = named_parameters_of(closure.model, self.param_groups[0]["params"])
        z = {}
        for name, p in named.items():
            if "z" not in self.state[p]:
                self.state[p]["z"] = torch.zeros_like(p)
            z[name] = self.state[p]["z"]
        op = CurvatureOperator(
            model=closure.model,
            params={name: p.detach() for name, p in named.items()},
            batches=closure.micro_batches,
            loss_kind=closure.loss_kind,
            comm=getattr(closure, "comm", None),
            cache=False,
        )
        return op, z

    def _adapt_damping(
        self,
        group: dict[str, Any],
        op: CurvatureOperator,
        x: Tensor,
        quadratic: tuple[Tensor, Tensor],
        loss: Tensor,
    ) -> None:
        """The ``λ`` test: ``predicted = q(z') = ½ xᵀMx + xᵀc`` against ``f̂(w + z') - f̂(w)``."""
        matrix, rhs = quadratic
        predicted = 0.5 * x @ matrix @ x + x @ rhs
        new_loss = mean_loss(op.model, op.params, op.batches, op.loss_kind, op.comm)
        actual = new_loss.double() - loss.double()
        group["damping"] = adapt_damping(
            group["damping"],
            actual=actual,
            predicted=predicted,
            low=group["lambda_low"],
            high=group["lambda_high"],
            factor=group["lambda_factor"] ** group["lambda_every"],
        )
        self.diagnostics["curveball_ratio"] = actual / predicted

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (bitwise), ``λ`` back on the device."""
        super().load_state_dict(state_dict)
        self._place_damping()


def _check_closure(closure: Any) -> None:
    for attribute in ("model", "micro_batches", "loss_kind"):
        if not hasattr(closure, attribute):
            raise TypeError(
                "CurveBall.step needs a BatchClosure (model, micro_batches, loss_kind, comm) "
                f"to form Gauss-Newton products; got {type(closure).__name__}"
            )


def _reduce(
    op: CurvatureOperator,
    z: dict[str, Tensor],
    deltas: list[Tensor],
    damping: Tensor,
    *,
    need_model: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The global loss and, with ``need_model``, ``M`` (``Ĥ = G + λI``) and ``c``.

    The loss and ``G``'s five output-space scalars are averaged over ranks in one collective;
    the ``λ`` terms are parameter-space dot products, identical on every rank.
    """
    scalars = torch.stack(op.losses).mean().reshape(1)
    if need_model:  # ĤΔz enters only through output-space products: no backward
        scalars = torch.cat([scalars, op.local_plane_model(dict(zip(z, deltas, strict=True)))])
    all_reduce_vectors([scalars], op.comm)
    if not need_model:
        return scalars[0], None
    zs = list(z.values())
    zz, zd, dd = dot(zs, zs), dot(zs, deltas), dot(deltas, deltas)
    g_zz, g_zd, g_dd = scalars[1:4].double()
    lam = damping
    matrix = torch.stack([g_zz + lam * zz, g_zd + lam * zd, g_zd + lam * zd, g_dd + lam * dd])
    return scalars[0], (matrix.view(2, 2), scalars[4:6].double())


def _step_sizes(
    group: dict[str, Any], quadratic: tuple[Tensor, Tensor] | None, loss: Tensor
) -> Tensor:
    """``x = [ρ, -β]``: automatic (the 2x2 solve), or the fixed ``momentum`` and ``lr``."""
    if group["auto_params"]:
        return solve_step_sizes(*quadratic, rtol=1e3 * torch.finfo(loss.dtype).eps)
    zero = torch.zeros((), dtype=torch.float64, device=loss.device)  # no host copy
    return torch.stack([zero + group["momentum"], zero - group["lr"]])
