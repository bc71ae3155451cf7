"""``model.weights``: a torchvision-format state_dict loads strictly, mismatches are one error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config
from test_resnet import reference_layout

from secondorder.build import build_model
from secondorder.config import ConfigError, validate
from secondorder.models import build_model as build_network
from secondorder.models.weights import WeightsError, load_weights

CPU = torch.device("cpu")


def _run(path: Path | str, model: str = "resnet18", *extra: str):
    return validate(
        compose_config([f"model={model}", "data=imagenet", f"model.weights={path}", *extra])
    )


def test_torchvision_layout_of_resnet50_loads_exactly(tmp_path: Path) -> None:
    # A file with torchvision's names and shapes, written from the independent reference layout,
    # without num_batches_tracked (torchvision's published files predate it).
    gen = torch.Generator().manual_seed(3)
    state = {
        key: torch.randn(shape, generator=gen) if shape else torch.tensor(0)
        for key, shape in reference_layout([3, 4, 6, 3], bottleneck=True).items()
        if not key.endswith("num_batches_tracked")
    }
    torch.save(state, tmp_path / "resnet50.pth")
    model = build_model(_run(tmp_path / "resnet50.pth", "resnet50"), CPU)
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_own_saved_model_round_trips_and_wins_over_the_seed(tmp_path: Path) -> None:
    torch.manual_seed(7)
    source = build_network("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model(_run(tmp_path / "w.pt"), CPU)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_missing_file_is_refused_at_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.weights: no such file: .*nothere.pt"):
        _run(tmp_path / "nothere.pt")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: s.pop("fc.weight"), r"missing keys fc\.weight"),
        (lambda s: s.update({"head.extra": torch.zeros(2)}), r"unexpected keys head\.extra"),
        (
            lambda s: s.update({"fc.weight": torch.zeros(10, 512)}),
            r"shape mismatch fc\.weight \(file \[10, 512\], model \[1000, 512\]\)",
        ),
        (
            lambda s: [s.pop(k) for k in list(s) if k.startswith("layer4")],
            r"missing keys layer4\.0\.conv1\.weight, layer4\.0\.bn1\.weight, "
            r"layer4\.0\.bn1\.bias and \d+ more",
        ),
    ],
)
def test_keys_or_shapes_that_differ_are_named(tmp_path: Path, corrupt, message: str) -> None:
    state = build_network("resnet18", num_classes=1000).state_dict()
    corrupt(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="model.weights: .*does not fit the model: " + message):
        build_model(_run(tmp_path / "bad.pt"), CPU)


def test_unreadable_file_and_non_state_dict(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    model = build_network("resnet18")
    with pytest.raises(WeightsError, match="not a readable torch state_dict"):
        load_weights(model, tmp_path / "junk.pt")
    with pytest.raises(WeightsError, match="holds no state_dict"):
        load_weights(model, tmp_path / "list.pt")


def test_cli_mismatch_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    state = build_network("resnet18", num_classes=10).state_dict()
    torch.save(state, tmp_path / "ten.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "secondorder.train",
            "model=resnet18",
            "data=synthetic",
            f"model.weights={tmp_path / 'ten.pt'}",
            f"trainer.run_dir={tmp_path / 'run'}",
            "logger=none",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.weights: "), result.stderr
    assert "shape mismatch fc.weight (file [10, 512], model [1000, 512])" in lines[0]
