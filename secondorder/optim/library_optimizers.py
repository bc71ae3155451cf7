"""Shampoo, SOAP and Muon from the ``pytorch-optimizer`` package: the strongest published
preconditioned baselines, run in the same trainer and grids as this package's own methods.

- :class:`Shampoo`: Gupta, Koren & Singer 2018, "Shampoo: Preconditioned Stochastic Tensor
  Optimization", Algorithm 2 (order-k tensors): per dimension i a statistic
  ``H_i += G_(i) G_(i)ᵀ`` (from ``ε I``) and the update ``G ×_1 H_1^{-1/2k} ... ×_k H_k^{-1/2k}``
  (a matrix: ``L^{-1/4} G R^{-1/4}``; a vector: ``H^{-1/2} g``), roots by SVD.
- :class:`SOAP`: Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam": Adam in
  the eigenbasis of Shampoo's (moving-average) statistics, the basis refreshed every
  ``precondition_frequency`` steps.
- :class:`Muon`: Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-Schulz": Nesterov
  momentum orthogonalised by Newton-Schulz iterations for weight matrices, AdamW for the rest.

Why this package: it is maintained, pure Python and runs eagerly (no ``torch.compile``), so it
works on CPU torch as it does on GPUs, and each optimizer keeps the ``step(closure)`` contract of
``torch.optim``. (``heavyball`` compiles every update with inductor: minutes of compilation for a
few steps of a tiny model on CPU.) It is an optional extra: ``pip install '.[baselines]'``.

Data parallelism needs nothing here: the closure all-reduces the gradients before the library's
update runs, and the updates are deterministic, so every rank takes the same step.

Each class is a thin wrapper: its keyword-only signature is the config schema (the options a run
may set, with the library's defaults), the update is the library's; the wrapper shares the
library optimizer's ``param_groups``, ``state`` and ``state_dict``, so schedules and checkpoints
act on it directly.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["SOAP", "LibraryOptimizer", "Muon", "Shampoo", "missing_library"]

PACKAGE, DISTRIBUTION, EXTRA = "pytorch_optimizer", "pytorch-optimizer", "baselines"


def missing_library(cls: type) -> str | None:
    """What optimizer class ``cls`` lacks to run: the package and how to install it, or ``None``."""
    if not (isinstance(cls, type) and issubclass(cls, LibraryOptimizer)):
        return None
    if importlib.util.find_spec(PACKAGE) is not None:
        return None
    return f"the {DISTRIBUTION} package (pip install '.[{EXTRA}]')"


def _check(**rules: tuple[Any, bool, str]) -> None:
    """Raise ``ValueError`` naming the first argument that breaks its rule, as ``torch.optim``
    does (the library's own messages name its keys, not this package's)."""
    for key, (value, ok, rule) in rules.items():
        if not ok:
            raise ValueError(f"Invalid {key} value: {value} ({rule})")


def _unit(value: float) -> bool:
    return 0.0 <= value < 1.0


class LibraryOptimizer(torch.optim.Optimizer):
    """A ``pytorch-optimizer`` class behind this package's keyword-only signature.

    ``torch.optim.Optimizer.__init__`` is not called: the library's optimizer is the one that
    holds the parameter groups and state; this object hands them out and forwards the calls.
    """

    library_class: ClassVar[str]

    def __init__(self, params: Any, **options: Any) -> None:
        missing = missing_library(type(self))
        if missing is not None:
            raise ModuleNotFoundError(f"{type(self).__name__} needs {missing}", name=PACKAGE)
        library = getattr(importlib.import_module(PACKAGE), self.library_class)
        self.inner = library(params, **options)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


class Shampoo(LibraryOptimizer):
    """Shampoo (Gupta et al. 2018), the original algorithm: no grafting, no blocking.

    Args:
        params: parameters.
        lr: learning rate η of ``W -= η H_1^{-1/2k} ... G``.
        momentum: the library's momentum: the gradient is mixed with the previous preconditioned
            update before preconditioning (0: the paper's algorithm).
        weight_decay: coupled L2 weight decay, added to the gradient.
        preconditioning_compute_steps: recompute the inverse roots every this many steps.
        matrix_eps: ε, the statistics' initial ``ε I``.
    """

    library_class = "Shampoo"

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        preconditioning_compute_steps: int = 1,
        matrix_eps: float = 1e-6,
    ) -> None:
        _check(
            lr=(lr, lr > 0, "> 0"),
            momentum=(momentum, _unit(momentum), "0 <= momentum < 1"),
            weight_decay=(weight_decay, weight_decay >= 0, ">= 0"),
            preconditioning_compute_steps=(
                preconditioning_compute_steps,
                preconditioning_compute_steps >= 1,
                ">= 1",
            ),
            matrix_eps=(matrix_eps, matrix_eps >= 0, ">= 0"),
        )
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            preconditioning_compute_steps=preconditioning_compute_steps,
            matrix_eps=matrix_eps,
        )


class SOAP(LibraryOptimizer):
    """SOAP (Vyas et al. 2024): Adam in Shampoo's eigenbasis.

    Args:
        params: parameters.
        lr: learning rate.
        betas: Adam's β1, β2 (given as ``beta1``, ``beta2`` in a config).
        shampoo_beta: decay of the Shampoo statistics (``None``: β2).
        weight_decay: decoupled weight decay.
        precondition_frequency: refresh the eigenbasis every this many steps.
        max_precondition_dim: dimensions larger than this are left in the identity basis.
        merge_dims: merge small dimensions before preconditioning.
        precondition_1d: also precondition vectors (biases) with a full matrix.
        eps: Adam's ε.
    """

    library_class = "SOAP"

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precondition_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        eps: float = 1e-8,
    ) -> None:
        _check(
            lr=(lr, lr > 0, "> 0"),
            beta1=(betas[0], _unit(betas[0]), "0 <= beta1 < 1"),
            beta2=(betas[1], _unit(betas[1]), "0 <= beta2 < 1"),
            shampoo_beta=(shampoo_beta, shampoo_beta is None or _unit(shampoo_beta), "[0, 1)"),
            weight_decay=(weight_decay, weight_decay >= 0, ">= 0"),
            precondition_frequency=(precondition_frequency, precondition_frequency >= 1, ">= 1"),
            max_precondition_dim=(max_precondition_dim, max_precondition_dim >= 1, ">= 1"),
            eps=(eps, eps >= 0, ">= 0"),
        )
        super().__init__(
            params,
            lr=lr,
            betas=tuple(betas),
            shampoo_beta=shampoo_beta,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precondition_dim=max_precondition_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            eps=eps,
        )


class Muon(LibraryOptimizer):
    """Muon (Jordan et al. 2024) for the hidden weight matrices, AdamW for everything else.

    Which tensors get Muon is the usual rule: every parameter of two or more dimensions except the
    last such one, the output layer, in the order of ``params`` (``model.parameters()``); biases,
    norm gains and the output layer get AdamW with the ``adamw_*`` options. Each group's learning
    rate follows the run's schedule.

    Args:
        params: parameters, in the model's order.
        lr: Muon's learning rate.
        momentum: Muon's momentum.
        nesterov: Nesterov momentum.
        ns_steps: Newton-Schulz iterations.
        weight_decay: Muon's decoupled weight decay.
        adamw_lr: AdamW's learning rate.
        adamw_betas: AdamW's β1, β2 (``adamw_beta1``, ``adamw_beta2`` in a config).
        adamw_weight_decay: AdamW's decoupled weight decay.
        adamw_eps: AdamW's ε.
    """

    library_class = "Muon"

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_weight_decay: float = 0.0,
        adamw_eps: float = 1e-10,
    ) -> None:
        _check(
            lr=(lr, lr > 0, "> 0"),
            momentum=(momentum, _unit(momentum), "0 <= momentum < 1"),
            ns_steps=(ns_steps, ns_steps >= 1, ">= 1"),
            weight_decay=(weight_decay, weight_decay >= 0, ">= 0"),
            adamw_lr=(adamw_lr, adamw_lr > 0, "> 0"),
            adamw_beta1=(adamw_betas[0], _unit(adamw_betas[0]), "0 <= adamw_beta1 < 1"),
            adamw_beta2=(adamw_betas[1], _unit(adamw_betas[1]), "0 <= adamw_beta2 < 1"),
            adamw_weight_decay=(adamw_weight_decay, adamw_weight_decay >= 0, ">= 0"),
            adamw_eps=(adamw_eps, adamw_eps >= 0, ">= 0"),
        )
        params = list(params)
        matrices = [i for i, p in enumerate(params) if p.ndim >= 2]
        hidden = set(matrices[:-1])
        groups = [
            {"params": [p for i, p in enumerate(params) if i in hidden], "use_muon": True},
            {"params": [p for i, p in enumerate(params) if i not in hidden], "use_muon": False},
        ]
        super().__init__(
            [g for g in groups if g["params"]],
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            adamw_lr=adamw_lr,
            adamw_betas=tuple(adamw_betas),
            adamw_wd=adamw_weight_decay,
            adamw_eps=adamw_eps,
        )
