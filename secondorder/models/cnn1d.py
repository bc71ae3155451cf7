"""Small 1-D convolutional classifier for MNIST-1D."""

from __future__ import annotations

import torch
from torch import nn

from secondorder.models._common import ModelSpec

_KERNEL = 5
_STRIDE = 2
_PADDING = 1
_NUM_CONV = 3


def _conv_out_length(length: int) -> int:
    return (length + 2 * _PADDING - _KERNEL) // _STRIDE + 1


class CNN1d(nn.Module):
    """Three strided ``Conv1d`` + ReLU layers followed by a linear classifier.

    Modelled on the convolutional baseline of the MNIST-1D benchmark: every convolution has
    kernel 5, stride 2 and padding 1, so a length-40 signal shrinks 40 -> 19 -> 9 -> 4 before it
    is flattened (``channels * 4`` features) and mapped to ``num_classes`` logits. There is no
    normalization layer, so every parameterized layer is a ``Conv1d`` or ``Linear``.

    Args:
        in_length: Length of the input signal.
        channels: Number of channels of every convolution.
        num_classes: Number of output logits.
    """

    def __init__(self, *, in_length: int = 40, channels: int = 32, num_classes: int = 10):
        super().__init__()
        length = in_length
        for _ in range(_NUM_CONV):
            length = _conv_out_length(length)
        if length < 1:
            raise ValueError(f"in_length={in_length} is too short for {_NUM_CONV} strided convs")
        if channels < 1 or num_classes < 1:
            raise ValueError("channels and num_classes must be positive")
        self.in_length = in_length
        self.conv1 = nn.Conv1d(1, channels, _KERNEL, stride=_STRIDE, padding=_PADDING)
        self.conv2 = nn.Conv1d(channels, channels, _KERNEL, stride=_STRIDE, padding=_PADDING)
        self.conv3 = nn.Conv1d(channels, channels, _KERNEL, stride=_STRIDE, padding=_PADDING)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes logits.

        Args:
            x: Signals of shape ``(N, in_length)`` or ``(N, 1, in_length)``.

        Returns:
            Logits of shape ``(N, num_classes)``.
        """
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.fc(self.flatten(x))


def cnn1d(*, in_length: int = 40, channels: int = 32, num_classes: int = 10) -> nn.Module:
    """Builds :class:`CNN1d`, the MNIST-1D convolutional classifier.

    Args:
        in_length: Length of the input signal (40 for MNIST-1D).
        channels: Number of channels of each of the three convolutions.
        num_classes: Number of output logits.

    Returns:
        The model; it accepts ``(N, in_length)`` or ``(N, 1, in_length)`` float inputs.
    """
    return CNN1d(in_length=in_length, channels=channels, num_classes=num_classes)


def cnn1d_spec(*, in_length: int, num_classes: int, **_: object) -> ModelSpec:
    """:func:`cnn1d` reads signals ``(in_length,)`` or ``(1, in_length)``."""
    return ModelSpec(
        ("in_length",), input_shapes=((in_length,), (1, in_length)), num_classes=num_classes
    )
