"""The settings of a fast GPU step, applied to a built model: memory format, cuDNN, compile.

- ``channels_last``: convolutions on CUDA run fastest with NHWC tensors (tensor-core kernels
  without layout transposes). A model with 2-D convolutions on a CUDA device gets its weights in
  ``torch.channels_last`` and a forward pre-hook that puts 4-D inputs in the same format, so
  every caller (training step, evaluation, K-FAC's statistics) hands over inputs as they are.
- ``cudnn.benchmark``: cuDNN times its algorithms once per input shape and keeps the fastest;
  fixed shapes (a training run) gain, at the price of run-to-run bitwise reproducibility.
- ``torch.compile``: :meth:`torch.nn.Module.compile` compiles the forward in place, so
  parameter names (and checkpoints) stay those of the plain model. Only optimizers that need
  nothing but the loss and the gradients may use it: see
  :data:`~secondorder.trainer.settings.COMPILE_REFUSED`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["apply_gpu_step", "has_conv2d", "to_channels_last"]


def has_conv2d(model: nn.Module) -> bool:
    """Whether ``model`` has a 2-D convolution (the layers channels_last speeds up)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_channels_last(inputs: torch.Tensor) -> torch.Tensor:
    """A 4-D CUDA batch in ``channels_last`` (NHWC) memory; any other tensor as it is."""
    if inputs.ndim == 4 and inputs.is_cuda:
        return inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def _inputs_to_channels_last(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(to_channels_last(a) if isinstance(a, torch.Tensor) else a for a in args)


def apply_gpu_step(
    model: nn.Module, device: torch.device, *, cudnn_benchmark: bool, compile: bool
) -> list[str]:
    """Apply the GPU step settings to ``model`` on ``device``; returns what was applied, in
    words (``channels_last``, ``cudnn.benchmark``, ``torch.compile``) for the run's record.

    On a CPU device only ``compile`` applies (the others are CUDA features).
    """
    applied = []
    if device.type == "cuda" and has_conv2d(model):
        model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_inputs_to_channels_last)
        applied.append("channels_last")
    if device.type == "cuda" and cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        applied.append("cudnn.benchmark")
    if compile:
        model.compile()
        applied.append("torch.compile")
    return applied
