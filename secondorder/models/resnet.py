"""Residual networks: ImageNet ResNet-18/50 and the CIFAR ResNet-20.

The ImageNet models use the same module names and parameter shapes as the reference
torchvision implementations, so their state dicts load into each other with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from secondorder.models._common import ModelSpec


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution.
        downsample: Shortcut module used when the shape changes, else ``None`` (identity).
    """

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        *,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        """Returns the batch norm closing the residual branch."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand convolutions with a residual connection.

    The stride sits on the 3x3 convolution (the "ResNet v1.5" placement used by torchvision).

    Args:
        in_planes: Input channels.
        planes: Bottleneck width; the block outputs ``planes * 4`` channels.
        stride: Stride of the 3x3 convolution.
        downsample: Shortcut module used when the shape changes, else ``None`` (identity).
    """

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        *,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ):
        super().__init__()
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        """Returns the batch norm closing the residual branch."""
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _init_weights(model: nn.Module, *, zero_init_residual: bool) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                nn.init.zeros_(module.last_bn().weight)


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck],
    in_planes: int,
    planes: int,
    *,
    blocks: int,
    stride: int,
) -> nn.Sequential:
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = _projection(in_planes, out_planes, stride)
    layers = [block(in_planes, planes, stride=stride, downsample=downsample)]
    layers += [block(out_planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ImageNet-style residual network (7x7 stem, max pool, four stages, global pool, fc).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: Number of blocks in each of the four stages.
        num_classes: Number of output logits.
        in_channels: Input image channels.
        zero_init_residual: Zero the last batch-norm scale of every residual branch, so each
            block starts as the identity.
    """

    def __init__(
        self,
        *,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {layers}")
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stage = _make_stage(block, in_planes, planes, blocks=blocks, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
            in_planes = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self, zero_init_residual=zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images ``(N, C, H, W)`` to logits ``(N, num_classes)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(nn.Module):
    """CIFAR-style residual network of He et al. (2016), Section 4.2.

    A 3x3 stem with 16 channels, three stages of basic blocks with 16/32/64 channels (the
    second and third start with stride 2), global average pooling and a linear classifier.
    Where a block changes the shape, the shortcut is a projection (1x1 convolution + batch
    norm, "option B") rather than the paper's zero-padding identity ("option A").

    Args:
        blocks_per_stage: Basic blocks per stage (3 gives ResNet-20).
        num_classes: Number of output logits.
        in_channels: Input image channels.
    """

    def __init__(self, *, blocks_per_stage: int = 3, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            stage = _make_stage(
                BasicBlock, in_planes, planes, blocks=blocks_per_stage, stride=1 if i == 0 else 2
            )
            self.add_module(f"layer{i + 1}", stage)
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self, zero_init_residual=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images ``(N, C, H, W)`` to logits ``(N, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(
    *, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False
) -> nn.Module:
    """Builds ResNet-18: basic blocks, stages [2, 2, 2, 2]; 11,689,512 parameters at 1000 classes.

    The arguments are :class:`ResNet`'s.
    """
    return _imagenet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, zero_init_residual)


def resnet50(
    *, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False
) -> nn.Module:
    """Builds ResNet-50: bottlenecks, stages [3, 4, 6, 3]; 25,557,032 parameters at 1000 classes.

    The arguments are :class:`ResNet`'s.
    """
    return _imagenet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, zero_init_residual)


def _imagenet(
    block: type[BasicBlock] | type[Bottleneck],
    layers: list[int],
    num_classes: int,
    in_channels: int,
    zero_init_residual: bool,
) -> ResNet:
    return ResNet(
        block=block,
        layers=layers,
        num_classes=num_classes,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
    )


def resnet20(*, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Builds the CIFAR ResNet-20 of He et al. (2016).

    Three stages of three basic blocks (16/32/64 channels) after a 3x3 stem, then global
    average pooling and a linear layer. Shortcuts that change shape use projections
    (1x1 convolution + batch norm); the others are identities.

    Args:
        num_classes: Number of output logits.
        in_channels: Input image channels.

    Returns:
        A :class:`CifarResNet` taking images ``(N, C, H, W)`` (32x32 for CIFAR).
    """
    return CifarResNet(blocks_per_stage=3, num_classes=num_classes, in_channels=in_channels)


def resnet_spec(*, num_classes: int, in_channels: int, **_: object) -> ModelSpec:
    """Every ResNet here reads images ``(in_channels, H, W)`` of any size (global pooling)."""
    return ModelSpec(
        ("in_channels",), input_shapes=((in_channels, None, None),), num_classes=num_classes
    )
