"""The layers K-FAC preconditions, and how their Kronecker-factor rows are read from them.

A layer computes ``s = W̄ ā`` for every example (and, for a convolution, every output position):
``W̄ = [W, b]`` is the weight with the bias as its last column and ``ā = [a; 1]`` the input with
the homogeneous coordinate (Martens & Grosse 2015, section 2.1). K-FAC needs, per layer,

- the activation rows ``a`` (one per example and position; the ``1`` is added by the factor
  code, never concatenated here, so large patch matrices are not copied), and
- the output-gradient rows ``g = ∂ℓ/∂s`` (one per example and position).

Convolutions follow Grosse & Martens 2016 ("A Kronecker-factored approximate Fisher matrix for
convolution layers", KFC): the rows of ``a`` are the unfolded input patches (strided windows; the
patch order ``(channel, kernel offsets)`` matches ``weight.reshape(out, -1)``), one per output
position ``t ∈ T``. ``Linear`` layers applied to ``(N, ..., in)`` inputs treat the middle
dimensions the same way, as positions sharing the weight.

Covered: ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` with ``groups == 1`` (any stride,
dilation, integer/``"valid"``/``"same"`` padding, any ``padding_mode``). Everything else with
parameters (norm layers, embeddings, grouped convolutions, excluded names) is left to the
optimizer's "other" path.

Doubly-factored layers (Ba, Grosse & Martens 2017): when the ``A`` factor's dimension (input
features, plus one for a bias) exceeds ``double_factor_threshold``, each activation row (without
the homogeneous coordinate) is viewed row-major as a ``d1 × d2`` matrix: ``(in_channels,
kernel offsets)`` for a convolution whose kernel has more than one offset, otherwise the most
balanced ``d1 · d2 = in`` with ``d1 >= d2``. See :mod:`secondorder.optim.kfac.capture` for the
approximation itself.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KFACLayer", "find_layers", "matches_any"]


@dataclass(eq=False)
class KFACLayer:
    """One preconditioned layer.

    Attributes:
        name: the module's qualified name in the model.
        module: the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``.
        weight: its weight parameter.
        bias: its bias parameter when the optimizer trains it (folded into ``A``), else ``None``.
        out_dim: ``dim G`` (output features / channels).
        in_dim: weight columns without the bias (``in_features`` or ``C_in · kernel``).
        double_shape: ``(d1, d2)`` for a doubly-factored layer, else ``None``.
    """

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    out_dim: int
    in_dim: int
    double_shape: tuple[int, int] | None = None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def a_dim(self) -> int:
        """``dim A``: input features plus the homogeneous coordinate when there is a bias."""
        return self.in_dim + int(self.has_bias)

    def factor_dims(self) -> dict[str, int]:
        """The Kronecker factors this layer keeps and their sizes (paper symbols as keys)."""
        if self.double_shape is not None:
            d1, d2 = self.double_shape
            return {"K": d1, "Psi": d2, "G": self.out_dim}
        return {"A": self.a_dim, "G": self.out_dim}

    def examples(self, x: Tensor) -> int:
        """Number of examples in the layer input ``x`` (unbatched inputs count as one)."""
        unbatched = x.dim() == (2 if isinstance(self.module, nn.Conv1d) else 3)
        if isinstance(self.module, nn.Linear):
            unbatched = x.dim() == 1
        return 1 if unbatched else x.shape[0]

    def activation_rows(self, x: Tensor) -> Tensor:
        """Rows ``a`` of shape ``(examples · positions, in_dim)`` for the input ``x``."""
        if isinstance(self.module, nn.Linear):
            return x.reshape(-1, self.in_dim)
        return _conv_patches(self.module, x)

    def output_rows(self, g: Tensor) -> Tensor:
        """Rows ``g`` of shape ``(examples · positions, out_dim)`` from an output(-gradient)."""
        if isinstance(self.module, nn.Linear):
            return g.reshape(-1, self.out_dim)
        if g.dim() == self.module.weight.dim() - 1:  # unbatched convolution
            g = g.unsqueeze(0)
        return g.movedim(1, -1).reshape(-1, self.out_dim)

    def gradient_matrix(self, grad_weight: Tensor, grad_bias: Tensor | None) -> Tensor:
        """``∇W̄ = [∇W, ∇b]`` of shape ``(out_dim, a_dim)``."""
        g = grad_weight.reshape(self.out_dim, self.in_dim)
        if not self.has_bias:
            return g
        if grad_bias is None:
            grad_bias = torch.zeros(self.out_dim, dtype=g.dtype, device=g.device)
        return torch.cat([g, grad_bias.reshape(self.out_dim, 1)], dim=1)

    def split_matrix(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`gradient_matrix`: weight-shaped and bias-shaped tensors."""
        w = matrix[:, : self.in_dim].reshape(self.weight.shape)
        b = matrix[:, self.in_dim].reshape(self.bias.shape) if self.has_bias else None
        return w, b


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of ``patterns`` as an fnmatch glob or a full regex."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:  # a glob such as "*.fc" is not a valid regex
            continue
    return False


def find_layers(
    model: nn.Module,
    params: Iterable[Tensor],
    *,
    exclude: Sequence[str] = (),
    double_factor_threshold: int,
) -> list[KFACLayer]:
    """The K-FAC layers of ``model`` whose weight is among the optimized ``params``.

    A layer is skipped (its parameters go to the optimizer's "other" path) when its type is not
    covered, its name matches ``exclude``, its weight is frozen or not optimized, or its weight
    is shared with another covered module.
    """
    optimized = {id(p) for p in params}
    seen: dict[int, int] = {}
    layers: list[KFACLayer] = []
    for name, module in model.named_modules():
        if not _covered(module) or matches_any(name, exclude):
            continue
        weight = module.weight
        if id(weight) not in optimized or not weight.requires_grad:
            continue
        bias = module.bias
        if bias is not None and (id(bias) not in optimized or not bias.requires_grad):
            bias = None
        out_dim = weight.shape[0]
        in_dim = weight[0].numel()
        double = None
        if in_dim + (bias is not None) > double_factor_threshold:  # dim A = in (+ 1 for bias)
            double = _double_shape(module, in_dim)
        seen[id(weight)] = seen.get(id(weight), 0) + 1
        layers.append(KFACLayer(name, module, weight, bias, out_dim, in_dim, double))
    return [layer for layer in layers if seen[id(layer.weight)] == 1]


def _covered(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return isinstance(module.weight, nn.Parameter)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return module.groups == 1 and isinstance(module.weight, nn.Parameter)
    return False


def _double_shape(module: nn.Module, in_dim: int) -> tuple[int, int]:
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        offsets = math.prod(module.kernel_size)
        if offsets > 1:
            return module.in_channels, offsets
    d2 = max(d for d in range(1, math.isqrt(in_dim) + 1) if in_dim % d == 0)
    return in_dim // d2, d2


def _conv_patches(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Patch rows ``(N · positions, C_in · kernel)`` exactly as the convolution sees them.

    Built from strided views (``Tensor.unfold``) and ONE copy, whatever the batch size
    (``F.unfold`` on CUDA launches a kernel per example).
    """
    one_d = isinstance(conv, nn.Conv1d)
    if x.dim() == (2 if one_d else 3):
        x = x.unsqueeze(0)
    if one_d:
        x = x.unsqueeze(2)  # (N, C, 1, L): a 2-D convolution with a 1-row kernel
    kernel = _pair(conv.kernel_size, one_d, 1)
    stride = _pair(conv.stride, one_d, 1)
    dilation = _pair(conv.dilation, one_d, 1)
    if isinstance(conv.padding, str):
        # "same": total padding dilation·(k-1) per dim, the odd unit on the right (as torch).
        pads: list[int] = []
        if conv.padding == "same":
            for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
    else:
        pads = []
        for p in reversed(_pair(conv.padding, one_d, 0)):
            pads += [p, p]
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    n, channels = x.shape[:2]
    windows = x.unfold(2, dilation[0] * (kernel[0] - 1) + 1, stride[0])
    windows = windows.unfold(3, dilation[1] * (kernel[1] - 1) + 1, stride[1])
    windows = windows[..., :: dilation[0], :: dilation[1]]  # (N, C, OH, OW, kh, kw)
    positions = windows.shape[2] * windows.shape[3]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(n * positions, -1)


def _pair(value: int | tuple[int, ...], one_d: bool, filler: int) -> tuple[int, int]:
    values = (value,) if isinstance(value, int) else tuple(value)
    # A Conv1d is unfolded as a 2-D convolution over (1, L): kernel/stride/dilation 1 and
    # padding 0 along the dummy height.
    return (filler, values[0]) if one_d else (values[0], values[-1])
