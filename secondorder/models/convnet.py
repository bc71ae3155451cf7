"""A CIFAR-sized CNN: two 3x3 convolutions (32, 64 channels), a 4096->256 linear, a classifier.

The per-step cost reference of the K-FAC benchmarks: small convolutions next to one wide linear
layer, the mix where Kronecker factors of different sizes meet.
"""

from __future__ import annotations

from torch import nn

from secondorder.models._common import ModelSpec


def convnet(*, in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> nn.Module:
    """conv3x3(32)-ReLU-maxpool2 -> conv3x3(64)-ReLU-maxpool2 -> linear(64*(s/4)^2, 256)-ReLU ->
    linear(256, num_classes). For 32x32 inputs the wide layer is 4096 -> 256.

    Args:
        in_channels: image channels.
        image_size: input height and width (divisible by 4).
        num_classes: output logits.
    """
    if image_size % 4 or image_size < 4:
        raise ValueError(f"image_size must be a positive multiple of 4, got {image_size}")
    features = 64 * (image_size // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(features, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def convnet_spec(*, in_channels: int, image_size: int, num_classes: int, **_: object) -> ModelSpec:
    """:func:`convnet` reads images ``(in_channels, image_size, image_size)``: its wide linear
    layer is sized for that image."""
    return ModelSpec(
        ("in_channels", "image_size"),
        input_shapes=((in_channels, image_size, image_size),),
        num_classes=num_classes,
    )
