"""Tests for the dataset registry, the shared types and the data configs."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from secondorder.data import (
    DATASETS,
    DataBundle,
    DataError,
    TensorPairDataset,
    build_data,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "data"
TRAINER_KEYS = {"name", "batch_size", "eval_batch_size", "num_workers", "loader"}
SIMPLE_TYPES = {int, float, bool, str, list[int], str | None, list[int] | None}


def test_registry_keys() -> None:
    assert set(DATASETS) == {"mnist1d", "synthetic", "cifar10", "imagenet", "teacher_student"}


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_factory_signatures_are_keyword_only_with_simple_hints(name: str) -> None:
    factory = DATASETS[name]
    hints = typing.get_type_hints(factory)
    for param in inspect.signature(factory).parameters.values():
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, param
        assert param.default is not inspect.Parameter.empty, param
        assert hints[param.name] in SIMPLE_TYPES, (param.name, hints[param.name])


def test_build_data_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="cifar10.*imagenet.*mnist1d.*synthetic.*teacher_student"):
        build_data("mnist2d")


def test_build_data_dispatches() -> None:
    bundle = build_data("synthetic", num_samples=8, eval_samples=4, shape=[5], num_classes=3)
    assert isinstance(bundle, DataBundle)
    assert len(bundle.train) == 8 and bundle.input_shape == (5,)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_config_matches_factory(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECONDORDER_DATA", "/somewhere")
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"), resolve=True)
    assert cfg["name"] == name
    assert cfg["batch_size"] == 256 and cfg["eval_batch_size"] == 1024
    # Decoded per item: persistent workers, as many as the cores allow; in memory: none needed.
    assert cfg["num_workers"] == ("auto" if name == "imagenet" else 0)
    assert cfg["loader"] == "workers"
    params = inspect.signature(DATASETS[name]).parameters
    factory_keys = {key: value for key, value in cfg.items() if key not in TRAINER_KEYS}
    assert set(factory_keys) == set(params)
    for key, value in factory_keys.items():
        default = params[key].default
        if key == "root":
            assert value.startswith("/somewhere")
            assert value.removeprefix("/somewhere") == default.removeprefix("data")
        elif key == "shape":
            assert value == [3, 32, 32]
        else:
            assert value == default and type(value) is type(default), key


def test_config_root_env_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECONDORDER_DATA", raising=False)
    cfg = OmegaConf.load(CONFIG_DIR / "imagenet.yaml")
    assert cfg.root == "data/imagenet"
    assert OmegaConf.load(CONFIG_DIR / "mnist1d.yaml").root == "data"


def test_tensor_pair_dataset() -> None:
    x = torch.arange(24, dtype=torch.float64).view(6, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)
    data = TensorPairDataset(x, y)
    assert len(data) == 6
    xi, yi = data[4]
    assert xi.dtype == torch.float32 and yi.dtype == torch.int64 and yi.dim() == 0
    indices = torch.tensor([5, 0, 3])
    xb, yb = data.get_batch(indices)
    assert torch.equal(xb, torch.stack([data[int(i)][0] for i in indices]))
    assert torch.equal(yb, torch.stack([data[int(i)][1] for i in indices]))


def test_tensor_pair_dataset_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="number of samples"):
        TensorPairDataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        TensorPairDataset(torch.zeros(3, 2), torch.zeros(3))
