"""ResNet architecture tests against a reference layout written out independently here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder.models import build_model


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (channels,),
        f"{prefix}.bias": (channels,),
        f"{prefix}.running_mean": (channels,),
        f"{prefix}.running_var": (channels,),
        f"{prefix}.num_batches_tracked": (),
    }


def reference_layout(
    stages: list[int], *, bottleneck: bool, num_classes: int = 1000
) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of the published ImageNet ResNet (torchvision naming)."""
    expansion = 4 if bottleneck else 1
    ref = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    in_ch = 64
    for stage, (width, blocks) in enumerate(zip([64, 128, 256, 512], stages, strict=True), start=1):
        out_ch = width * expansion
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            if bottleneck:
                ref[f"{p}.conv1.weight"] = (width, in_ch, 1, 1)
                ref.update(_bn(f"{p}.bn1", width))
                ref[f"{p}.conv2.weight"] = (width, width, 3, 3)
                ref.update(_bn(f"{p}.bn2", width))
                ref[f"{p}.conv3.weight"] = (out_ch, width, 1, 1)
                ref.update(_bn(f"{p}.bn3", out_ch))
            else:
                ref[f"{p}.conv1.weight"] = (width, in_ch, 3, 3)
                ref.update(_bn(f"{p}.bn1", width))
                ref[f"{p}.conv2.weight"] = (width, width, 3, 3)
                ref.update(_bn(f"{p}.bn2", width))
            if b == 0 and (stage > 1 or in_ch != out_ch):
                ref[f"{p}.downsample.0.weight"] = (out_ch, in_ch, 1, 1)
                ref.update(_bn(f"{p}.downsample.1", out_ch))
            in_ch = out_ch
    ref["fc.weight"] = (num_classes, in_ch)
    ref["fc.bias"] = (num_classes,)
    return ref


SPECS = {
    "resnet18": ([2, 2, 2, 2], False, 11_689_512),
    "resnet50": ([3, 4, 6, 3], True, 25_557_032),
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(name) for name in SPECS}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_parameter_count(models: dict[str, nn.Module], name: str) -> None:
    assert sum(p.numel() for p in models[name].parameters()) == SPECS[name][2]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_state_dict_matches_reference(models: dict[str, nn.Module], name: str) -> None:
    stages, bottleneck, count = SPECS[name]
    ref = reference_layout(stages, bottleneck=bottleneck)
    got = {k: tuple(v.shape) for k, v in models[name].state_dict().items()}
    assert list(got) == list(ref)  # same keys in the same order
    assert got == ref
    n_params = sum(
        torch.Size(s).numel() for k, s in ref.items() if k.endswith((".weight", ".bias"))
    )
    assert n_params == count


@pytest.mark.parametrize("name", sorted(SPECS))
def test_strict_load_between_fresh_models(models: dict[str, nn.Module], name: str) -> None:
    torch.manual_seed(1)
    other = build_model(name)
    result = other.load_state_dict(models[name].state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (k1, v1), (k2, v2) in zip(
        models[name].state_dict().items(), other.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)


def test_init_and_zero_init_residual(models: dict[str, nn.Module]) -> None:
    model = models["resnet50"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    # Kaiming normal, fan_out, relu gain: std = sqrt(2 / (out_channels * kh * kw)).
    w = model.layer3[0].conv2.weight
    expected = (2.0 / (w.shape[0] * w.shape[2] * w.shape[3])) ** 0.5
    assert abs(w.std().item() / expected - 1) < 0.05
    assert torch.all(model.layer1[0].bn3.weight == 1)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)

    zeroed = build_model("resnet18", zero_init_residual=True, num_classes=10)
    for stage in (zeroed.layer1, zeroed.layer2, zeroed.layer3, zeroed.layer4):
        for block in stage:
            assert torch.all(block.bn2.weight == 0)
            assert torch.all(block.bn1.weight == 1)


def test_resnet_options() -> None:
    model = build_model("resnet18", num_classes=5, in_channels=1).eval()
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_resnet20_layout() -> None:
    model = build_model("resnet20", num_classes=100, in_channels=1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    projections = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert len(convs) == 19  # stem + 3 stages x 3 blocks x 2 convs; +fc = 20 weighted layers
    assert [(c.out_channels, c.stride) for c in projections] == [(32, (2, 2)), (64, (2, 2))]
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    assert model.conv1.weight.shape == (16, 1, 3, 3)
    assert model.fc.weight.shape == (100, 64)
    n = sum(p.numel() for p in model.parameters())
    # 0.27M parameters as in the paper, plus the two projection shortcuts.
    assert 270_000 < n < 285_000
    model.train()
    out = model(torch.randn(4, 1, 32, 32))
    out.sum().backward()
    assert out.shape == (4, 100)
