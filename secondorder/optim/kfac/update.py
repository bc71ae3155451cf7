"""Steps 7-8 of K-FAC on flat buffers: KL-clipping, the non-finite guard, heavy-ball momentum.

The preconditioned gradients ``V`` arrive as :class:`Chunk` s, each a flat vector covering a
list of parameters (one chunk for a whole group of equal-shape layers), and are concatenated per
parameter group, dtype and device, so the clipping sum, the guard and the momentum update are a
handful of kernels for the whole model; only the final ``θ ← θ − lr m`` touches each parameter.
The momentum buffers live in one flat tensor per layout, and ``state[p]["momentum_buffer"]``
are views of it (``state_dict`` round-trips them per parameter as usual; after
``load_state_dict`` the flat tensor is rebuilt from them).

- KL-clipping (Ba, Grosse & Martens 2017, section 5): ``ν = min(1, √(κ / Σ_p lr_p² ⟨V_p, ∇_p⟩))``.
- Guard: the step is skipped, on the device and without a host sync, when ``Σ ⟨V, ∇⟩`` is not
  finite (any NaN/inf in ``V`` or ``∇`` makes it so): neither parameters nor momentum change.
- Momentum: ``m ← μ m + ν V``, ``θ ← θ − lr m``.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Chunk", "FlatUpdate"]


@dataclass
class Chunk:
    """Flat ``V`` and ``∇`` (1-D, same length) of ``params``, concatenated in that order."""

    params: list[Tensor]
    direction: Tensor
    grad: Tensor


class FlatUpdate:
    """Applies the clipped, guarded momentum update; owns the flat momentum buffers."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, ...], tuple[Tensor, list[Tensor]]] = {}

    def invalidate(self) -> None:
        """Forget the flat buffers (the state's ``momentum_buffer`` tensors were replaced)."""
        self._buffers.clear()

    def apply(
        self,
        param_groups: Sequence[dict[str, Any]],
        state: MutableMapping[Tensor, dict[str, Any]],
        chunks: Sequence[Chunk],
        *,
        kl_clip: float | None,
        keep_deltas: bool,
    ) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """Update the parameters of ``chunks`` in place (others are left alone).

        Returns:
            ``ν`` (0-d float64), whether the step was applied (0-d bool) and, with
            ``keep_deltas``, the applied change ``δ_p`` per parameter id.
        """
        packed = _pack(param_groups, chunks)
        if not packed:
            one = torch.ones((), dtype=torch.float64)
            return one, one.bool(), {}
        nu, ok = _clip_scale(packed, kl_clip)
        deltas: dict[int, Tensor] = {}
        for group, params, v, _ in packed:
            dtype, here = v.dtype, v.device
            ok_here = ok.to(here)

            def scalar(value: float, dtype=dtype, here=here) -> Tensor:
                return torch.full((), value, dtype=dtype, device=here)

            update = torch.where(ok_here, v * nu.to(here, dtype), 0.0)
            neg_lr = torch.where(ok_here, scalar(-group["lr"]), 0.0)
            if group["momentum"]:
                flat, views = self._buffer(params, state)
                flat.mul_(torch.where(ok_here, scalar(group["momentum"]), 1.0)).add_(update)
            else:
                views = [
                    t.view_as(p)
                    for t, p in zip(update.split([p.numel() for p in params]), params, strict=True)
                ]
            for p, view in zip(params, views, strict=True):
                p.addcmul_(view, neg_lr)
                if keep_deltas:
                    deltas[id(p)] = view * neg_lr
        return nu, ok, deltas

    def _buffer(
        self, params: list[Tensor], state: MutableMapping[Tensor, dict[str, Any]]
    ) -> tuple[Tensor, list[Tensor]]:
        key = tuple(id(p) for p in params)
        if key not in self._buffers:
            pieces = [state[p].get("momentum_buffer") for p in params]
            flat = _cat(
                [
                    torch.zeros_like(p) if b is None else b
                    for p, b in zip(params, pieces, strict=True)
                ]
            )
            views = [
                t.view_as(p)
                for t, p in zip(flat.split([p.numel() for p in params]), params, strict=True)
            ]
            for p, view in zip(params, views, strict=True):
                state[p]["momentum_buffer"] = view
            ids = set(key)  # buffers of an older layout of these parameters are stale
            self._buffers = {k: b for k, b in self._buffers.items() if ids.isdisjoint(k)}
            self._buffers[key] = (flat, views)
        return self._buffers[key]


def _cat(tensors: Sequence[Tensor]) -> Tensor:
    if len(tensors) == 1 and tensors[0].dim() == 1:
        return tensors[0]
    return torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors])


def _split_mixed(chunks: Sequence[Chunk], group_of: dict[int, int]) -> list[Chunk]:
    """Chunks whose parameters span several groups, dtypes or devices, split per parameter."""
    out = []
    for chunk in chunks:
        first = chunk.params[0]
        kind = (group_of[id(first)], first.dtype, first.device)
        if all((group_of[id(p)], p.dtype, p.device) == kind for p in chunk.params[1:]):
            out.append(chunk)
            continue
        sizes = [p.numel() for p in chunk.params]
        same = chunk.grad is chunk.direction
        for p, v, g in zip(
            chunk.params, chunk.direction.split(sizes), chunk.grad.split(sizes), strict=True
        ):
            out.append(Chunk([p], v, v if same else g))
    return out


Packed = tuple[dict[str, Any], list[Tensor], Tensor, Tensor]  # group, params, V, ⟨V, ∇⟩


def _pack(param_groups: Sequence[dict[str, Any]], chunks: Sequence[Chunk]) -> list[Packed]:
    """The chunks bucketed by (group, dtype, device): each bucket's ``V`` concatenated, with
    ``⟨V, ∇⟩``."""
    group_of = {id(p): i for i, group in enumerate(param_groups) for p in group["params"]}
    buckets: dict[tuple, list[Chunk]] = {}
    for chunk in _split_mixed(chunks, group_of):
        p = chunk.params[0]
        buckets.setdefault((group_of[id(p)], p.dtype, p.device), []).append(chunk)
    packed = []
    for (index, _, _), members in buckets.items():
        v = _cat([c.direction for c in members])
        same = all(c.grad is c.direction for c in members)
        g = v if same else _cat([c.grad for c in members])
        params = [p for c in members for p in c.params]
        packed.append((param_groups[index], params, v, torch.dot(v, g)))
    return packed


def _clip_scale(packed: list[Packed], kl_clip: float | None) -> tuple[Tensor, Tensor]:
    """``ν = min(1, √(κ / Σ_p lr_p² ⟨V_p, ∇_p⟩))`` and whether that sum is finite."""
    device = packed[0][2].device
    total = torch.stack(
        [dot.double().to(device) * group["lr"] ** 2 for group, _, _, dot in packed]
    ).sum()
    ok = torch.isfinite(total)
    nu = torch.ones_like(total)
    if kl_clip is not None:
        positive = total > 0
        nu = torch.where(positive, (kl_clip / torch.where(positive, total, 1.0)).sqrt(), 1.0)
        nu = nu.clamp(max=1.0)
    return nu, ok
