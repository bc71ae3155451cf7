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
its own), and one more forward-mode product ``J_f Δz`` for the automatic ``ρ``/``β``. ``H_L``,
the loss and the functional forward are :mod:`secondorder.optim.curvature`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value
from torch.optim import Optimizer

from secondorder.optim.curvature import (
    all_reduce_vectors,
    batch_loss,
    model_outputs,
    output_hessian,
)

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


class CurveBall(Optimizer):
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

    State: per parameter ``z``; globally the step count and ``λ`` (float64 tensor) in
    ``state_dict()["curveball"]``. One parameter group (``ρ``, ``β``, ``λ`` are global).

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
        first = self.param_groups[0]["params"][0]
        self._damping = torch.tensor(float(damping), dtype=torch.float64, device=first.device)
        self._steps = 0
        self.diagnostics: dict[str, float | Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only one group: ``ρ``, ``β`` and ``λ`` are global to the quadratic model."""
        if self.param_groups:
            raise ValueError("CurveBall supports one parameter group (ρ, β, λ are global)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor:
        """One CurveBall step on the closure's batch; returns the global mean loss (before it).

        Args:
            closure: a :class:`~secondorder.optim.closure.BatchClosure` (or an object with
                ``model``, ``micro_batches``, ``loss_kind`` and ``comm``).
        """
        for attribute in ("model", "micro_batches", "loss_kind"):
            if not hasattr(closure, attribute):
                raise TypeError(
                    "CurveBall.step needs a BatchClosure (model, micro_batches, loss_kind, comm) "
                    f"to form Gauss-Newton products; got {type(closure).__name__}"
                )
        group = self.param_groups[0]
        model, batches = closure.model, list(closure.micro_batches)
        kind, comm = closure.loss_kind, getattr(closure, "comm", None)
        named = _named_parameters(model, group["params"])
        z = {}
        for name, p in named.items():
            if "z" not in self.state[p]:
                self.state[p]["z"] = torch.zeros_like(p)
            z[name] = self.state[p]["z"]
        params = {name: p.detach() for name, p in named.items()}
        check_damping = group["auto_lambda"] and self._steps % group["lambda_every"] == 0
        need_model = group["auto_params"] or check_damping

        # Line 3 without λz, fused: per micro-batch one forward carrying J_f z and one backward of
        # H_L J_f z + ∂L/∂f, i.e. Jᵀ(H_L J_f z + ∂L/∂f) = G z + J; mean over micro-batches, ranks.
        passes, deltas = [], None
        for x, y in batches:
            pieces, grads = _linearised_pass(model, params, z, x, y, kind)
            passes.append(pieces)
            deltas = grads if deltas is None else torch._foreach_add(deltas, grads)
        if len(batches) > 1:
            torch._foreach_div_(deltas, float(len(batches)))
        all_reduce_vectors(deltas, comm)
        zs = list(z.values())
        torch._foreach_add_(deltas, torch._foreach_mul(zs, self._damping.to(zs[0].dtype)))

        scalars = [torch.stack([piece.loss for piece in passes]).mean()]
        if need_model:  # J_f Δz by forward mode: ĤΔz enters only through output dot products
            delta = dict(zip(z, deltas, strict=True))
            jd = [_jacobian_vector_product(model, params, delta, x) for x, _ in batches]
            hjd = [piece.output_hessian(u) for piece, u in zip(passes, jd, strict=True)]
            jz = [piece.jz for piece in passes]
            hjz = [piece.hjz for piece in passes]
            e = [piece.output_gradient for piece in passes]
            scalars += [
                _mean_dot(jz, hjz),  # zᵀGz
                _mean_dot(jz, hjd),  # zᵀGΔz
                _mean_dot(jd, hjd),  # ΔzᵀGΔz
                _mean_dot(e, jz),  # Jᵀz
                _mean_dot(e, jd),  # JᵀΔz
            ]
        reduced = torch.stack(scalars)
        all_reduce_vectors([reduced], comm)  # the loss and the five scalars: one collective
        loss = reduced[0]

        if need_model:  # M with Ĥ = G + λI, and c
            lam = self._damping
            zz, zd, dd = _dot(zs, zs), _dot(zs, deltas), _dot(deltas, deltas)
            g_zz, g_zd, g_dd = reduced[1:4].double()
            matrix = torch.stack(
                [g_zz + lam * zz, g_zd + lam * zd, g_zd + lam * zd, g_dd + lam * dd]
            )
            matrix, rhs = matrix.view(2, 2), reduced[4:6].double()
        if group["auto_params"]:
            x = solve_step_sizes(matrix, rhs, rtol=1e3 * torch.finfo(loss.dtype).eps)
        else:
            zero = torch.zeros((), dtype=torch.float64, device=loss.device)  # no host copy
            x = torch.stack([zero + group["momentum"], zero - group["lr"]])
        rho, beta = x[0], -x[1]

        # Lines 4-5: z ← ρz - βΔz, w ← w + z.
        torch._foreach_mul_(zs, rho.to(zs[0].dtype))
        torch._foreach_mul_(deltas, (-beta).to(zs[0].dtype))
        torch._foreach_add_(zs, deltas)
        torch._foreach_add_(list(params.values()), zs)

        self.diagnostics = {"curveball_rho": rho, "curveball_beta": beta}
        if check_damping:
            predicted = 0.5 * x @ matrix @ x + x @ rhs
            new_loss = _forward_loss(model, params, batches, kind, comm)
            self._damping = adapt_damping(
                self._damping,
                actual=new_loss.double() - loss.double(),
                predicted=predicted,
                low=group["lambda_low"],
                high=group["lambda_high"],
                factor=group["lambda_factor"] ** group["lambda_every"],
            )
            self.diagnostics["curveball_ratio"] = (new_loss.double() - loss.double()) / predicted
        self.diagnostics["curveball_lambda"] = self._damping
        self._steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The torch state (``z``) plus the step count and ``λ`` under ``"curveball"``."""
        state = super().state_dict()
        state["curveball"] = {"steps": self._steps, "damping": self._damping.clone()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (bitwise)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("curveball", None)
        if extra is None:
            raise ValueError("not a CurveBall optimizer state: the 'curveball' entry is missing")
        super().load_state_dict(state_dict)
        device = self.param_groups[0]["params"][0].device
        self._steps = int(extra["steps"])
        self._damping = torch.as_tensor(extra["damping"]).to(device=device, dtype=torch.float64)


def _named_parameters(model: nn.Module, params: list[Tensor]) -> dict[str, Tensor]:
    """The optimised parameters by name, in model order (the order of ``CurvatureOperator``)."""
    wanted = {id(p) for p in params}
    named = {name: p for name, p in model.named_parameters() if id(p) in wanted}
    if len(named) != len(wanted):
        raise ValueError("CurveBall's parameters must all belong to closure.model")
    return named


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    pairs = zip(a, b, strict=True)
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in pairs]).sum()


def _mean_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Mean over micro-batches of output-space dot products (each micro-batch's ``H_L`` is its
    own mean, so the mean is the product on their union)."""
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).mean()


def _forward_loss(
    model: nn.Module, params: dict[str, Tensor], batches: list, kind: Any, comm: Any
) -> Tensor:
    """``f̂(w)`` on the step's batch, computed like the pre-step loss (same dtype, no autocast)."""
    losses = [batch_loss(kind, model_outputs(model, params, x), y) for x, y in batches]
    loss = torch.stack(losses).mean().reshape(1)
    all_reduce_vectors([loss], comm)
    return loss[0]


class _Linearised(NamedTuple):
    """One micro-batch's output-space pieces of the fused pass."""

    loss: Tensor  # L_i
    jz: Tensor  # J_f z
    hjz: Tensor  # H_L J_f z
    output_gradient: Tensor  # e = ∂L_i/∂f
    output_hessian: Callable[[Tensor], Tensor]  # u ↦ H_L u


def _linearised_pass(
    model: nn.Module,
    params: dict[str, Tensor],
    z: dict[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    kind: Any,
) -> tuple[_Linearised, list[Tensor]]:
    """Forward once with dual numbers (``f`` and ``J_f z`` together), then one backward.

    Returns the output-space pieces and ``Jᵀ(H_L J_f z + e) = G_i z + J_i``.

    A thin companion to :class:`~secondorder.optim.curvature.CurvatureOperator`, whose
    ``vjp`` forward and separate ``jvp`` would run the primal forward twice. ``H_L`` and the loss
    are curvature.py's. This forward is the step's ordinary training forward: it updates
    batch-norm running statistics once per micro-batch, as a gradient step's forward does.
    """
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    with torch.enable_grad():
        with fwAD.dual_level():
            dual = {name: fwAD.make_dual(leaf, z[name]) for name, leaf in leaves.items()}
            outputs, jz = fwAD.unpack_dual(functional_call(model, dual, (inputs,), strict=False))
        jz = torch.zeros_like(outputs) if jz is None else jz.detach()
        detached = outputs.detach()
        e, loss = grad_and_value(lambda f: batch_loss(kind, f, targets))(detached)
        output_op = output_hessian(kind, detached)
        hjz = output_op(jz)
        grads = torch.autograd.grad(
            outputs, list(leaves.values()), hjz + e, allow_unused=True, materialize_grads=True
        )
    return _Linearised(loss.detach(), jz, hjz, e, output_op), list(grads)


def _jacobian_vector_product(
    model: nn.Module, params: dict[str, Tensor], vector: dict[str, Tensor], inputs: Tensor
) -> Tensor:
    """``J_f v`` by forward mode (no graph; batch-norm statistics untouched)."""
    with fwAD.dual_level():
        dual = {name: fwAD.make_dual(p, vector[name]) for name, p in params.items()}
        outputs, tangent = fwAD.unpack_dual(model_outputs(model, dual, inputs))
    return torch.zeros_like(outputs) if tangent is None else tangent
