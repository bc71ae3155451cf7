"""uint8 hand-over: images become normalised float32 on the device, exactly the float formula
the CPU workers used, once per micro-batch; float inputs pass through unchanged."""

from __future__ import annotations

import pytest
import torch

from secondorder.data.task import Task, device_inputs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _images(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0)).to(torch.uint8)


def _old_formula(x: torch.Tensor) -> torch.Tensor:
    """What the workers computed before: ``(x / 255 - mean) / std`` in float32."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(-1, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(mean).div_(std)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_uint8_normalised_on_the_device_equals_the_cpu_float_formula(device) -> None:
    x = _images(5, 3, 7, 6)
    got = device_inputs(x, device, (MEAN, STD))
    assert got.dtype == torch.float32 and got.device.type == device.type
    # Exactly equal: the same three IEEE float32 operations (divide, subtract, divide).
    assert torch.equal(got.cpu(), _old_formula(x))


def test_without_normalization_uint8_is_scaled_to_unit_range() -> None:
    x = _images(2, 3, 4, 4)
    got = device_inputs(x, torch.device("cpu"))
    assert torch.equal(got, x.float() / 255.0)
    assert got.min() >= 0 and got.max() <= 1


def test_float_inputs_pass_through_unchanged() -> None:
    x = torch.randn(4, 3, 5, 5)
    got = device_inputs(x, torch.device("cpu"), (MEAN, STD))
    assert got is x  # no copy, no normalisation: already done by whoever made it (DALI, CPU)


def test_reconstruction_targets_are_the_converted_inputs() -> None:
    x = _images(2, 3, 4, 4)
    inputs, targets = Task(kind="reconstruction", loss="mse").to_device(
        x, None, torch.device("cpu"), (MEAN, STD)
    )
    assert targets is inputs and torch.equal(inputs, _old_formula(x))
    inputs, labels = Task().to_device(x, torch.tensor([1, 0]), torch.device("cpu"), (MEAN, STD))
    assert torch.equal(inputs, _old_formula(x)) and labels.tolist() == [1, 0]
