"""The loop LARS and LAMB share: one update per parameter tensor (a "layer"), per-group options.

Both papers state their step for one layer ``l`` (You, Gitman & Ginsburg 2017, Algorithm 1; You
et al. 2020, Algorithm 2); :class:`LayerwiseOptimizer` runs the closure, walks the groups and
their parameters, and hands each gradient to the subclass's ``_update``. Per-group overrides of
the defaults are validated like the constructor's arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["LayerwiseOptimizer", "check_shared_options"]


class LayerwiseOptimizer(Optimizer):
    """Base of :class:`~secondorder.optim.lars.LARS` and :class:`~secondorder.optim.lamb.LAMB`.

    Subclasses implement :meth:`_check_group` (raise ``ValueError`` naming a bad value) and
    :meth:`_update` (the paper's step on one parameter tensor, in place).
    """

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, validating any per-group hyper-parameter overrides.

        Args:
            param_group: Dict with ``"params"`` and optional overrides of the defaults.

        Raises:
            ValueError: If an override is out of range.
        """
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one step: every parameter with a gradient gets its layer-wise update.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss. It is
                called under :func:`torch.enable_grad` before any parameter is touched.

        Returns:
            The closure's return value, or ``None`` when no closure is given.

        Raises:
            RuntimeError: If a gradient is sparse.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._update(p, p.grad, group)
        return loss


def check_shared_options(group: dict[str, Any], *, flags: tuple[str, ...]) -> None:
    """The checks LARS and LAMB share: ``lr``, ``eps``, ``weight_decay`` ``≥ 0``; ``flags`` bool.

    Raises:
        ValueError: naming the bad value.
    """
    if not 0.0 <= group["lr"]:
        raise ValueError(f"Invalid learning rate: {group['lr']}")
    for key, label in (("eps", "epsilon"), ("weight_decay", "weight_decay")):
        if not 0.0 <= group[key]:
            raise ValueError(f"Invalid {label} value: {group[key]}")
    for key in flags:
        if not isinstance(group[key], bool):
            raise ValueError(f"Invalid {key} value: {group[key]!r}")
