"""Tiny float64 problems the optimizer tests share, written out independently of the package.

A 4-5-3 tanh MLP, a batch for each loss kind, the three losses written by hand, flat views of the
model's parameters, and a closure that keeps float64 (``BatchClosure`` computes the loss in at
least float32 by design, which would round these references).
"""

from __future__ import annotations

import torch
from torch import nn

from secondorder.optim.closure import BatchClosure
from secondorder.optim.losses import loss_value

DTYPE = torch.float64
KINDS = ("cross_entropy", "mse", "bernoulli")


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def tiny_batch(kind: str, n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(n, 4)`` and targets for ``kind`` (3 classes or 3 outputs)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=DTYPE)
    if kind == "cross_entropy":
        return x, torch.randint(0, 3, (n,), generator=gen)
    if kind == "mse":
        return x, torch.randn(n, 3, generator=gen, dtype=DTYPE)
    return x, torch.rand(n, 3, generator=gen, dtype=DTYPE)


def loss_by_hand(kind: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The losses written out: mean over examples (and over elements for mse/bernoulli)."""
    if kind == "cross_entropy":
        logp = z - torch.logsumexp(z, dim=1, keepdim=True)
        return -logp.gather(1, y.unsqueeze(1)).mean()
    if kind == "mse":
        return ((z - y) ** 2).mean()
    return (torch.nn.functional.softplus(z) - y * z).mean()  # −y log σ − (1−y) log(1−σ)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflat_params(model: nn.Module, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of ``w`` by parameter name, shaped like the model's parameters."""
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = w[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


class Float64Closure(BatchClosure):
    """``BatchClosure`` without its float32 cast of the outputs, for float64 exactness tests."""

    def loss_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_value(self.loss_kind, self.model(inputs), targets)
