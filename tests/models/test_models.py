"""Tests for the model registry, the small models and the model configs."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from secondorder.models import MODELS, build_model
from secondorder.models.autoencoder import MNIST_WIDTHS, Autoencoder

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"

# Small inputs and the expected output shape for every registered model.
CASES: dict[str, tuple[dict, tuple[int, ...], tuple[int, ...]]] = {
    "mlp": ({}, (4, 40), (4, 10)),
    "cnn1d": ({}, (4, 40), (4, 10)),
    "convnet": ({}, (2, 3, 32, 32), (2, 10)),
    "autoencoder": ({}, (4, 40), (4, 40)),
    "resnet20": ({}, (2, 3, 32, 32), (2, 10)),
    "resnet18": ({"num_classes": 7}, (2, 3, 64, 64), (2, 7)),
    "resnet50": ({"num_classes": 7}, (2, 3, 64, 64), (2, 7)),
}
SIMPLE_TYPES = {int, float, bool, str, list[int], int | None, list[int] | None}


def test_registry_keys() -> None:
    assert set(MODELS) == {
        "mlp",
        "cnn1d",
        "convnet",
        "autoencoder",
        "resnet20",
        "resnet18",
        "resnet50",
    }
    assert set(CASES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name: str) -> None:
    torch.manual_seed(0)
    kwargs, in_shape, out_shape = CASES[name]
    model = build_model(name, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(in_shape))
    assert out.shape == out_shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_factory_signature_is_config_friendly(name: str) -> None:
    factory = MODELS[name]
    hints = typing.get_type_hints(factory)
    params = inspect.signature(factory).parameters
    assert params, name
    for pname, param in params.items():
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, pname
        assert param.default is not inspect.Parameter.empty, pname
        assert hints[pname] in SIMPLE_TYPES, (pname, hints[pname])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_matches_factory(name: str) -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))
    assert cfg.pop("name") == name
    loss = cfg.pop("loss")
    assert loss == ("mse" if name == "autoencoder" else "cross_entropy")
    task = cfg.pop("task")
    assert task == ("reconstruction" if name == "autoencoder" else "classification")
    # Keys every model takes, not factory arguments (the build applies them).
    assert (cfg.pop("weights"), cfg.pop("sync_bn")) == (None, False)
    params = inspect.signature(MODELS[name]).parameters
    # Every factory argument is listed, with its default where the default is not None.
    assert set(cfg) == set(params)
    for key, value in cfg.items():
        if params[key].default is not None:
            assert value == params[key].default, key
    assert isinstance(build_model(name, **cfg), nn.Module)


def test_config_files_cover_registry() -> None:
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == set(MODELS)


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match=r"Unknown model 'vgg'; choose one of: .*resnet50"):
        build_model("vgg")


@pytest.mark.parametrize("name", ["mlp", "autoencoder"])
def test_bad_activation(name: str) -> None:
    with pytest.raises(ValueError, match="activation"):
        build_model(name, activation="swishy")


def test_autoencoder_rejects_gelu() -> None:
    with pytest.raises(ValueError, match="relu, tanh, sigmoid"):
        build_model("autoencoder", activation="gelu")


def test_mlp_layers() -> None:
    model = build_model("mlp", in_features=12, hidden=[8, 6], num_classes=3, activation="tanh")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 8), (8, 6), (6, 3)]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    assert model(torch.randn(5, 3, 4)).shape == (5, 3)  # flattens its input
    # Default hidden list is not shared between models.
    assert build_model("mlp")[1].out_features == 256


def test_cnn1d_architecture_and_input_layouts() -> None:
    torch.manual_seed(0)
    model = build_model("cnn1d")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 3
    assert all(c.kernel_size == (5,) and c.stride == (2,) and c.padding == (1,) for c in convs)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.fc.in_features == 32 * 4  # 40 -> 19 -> 9 -> 4
    x = torch.randn(6, 40)
    assert torch.allclose(model(x), model(x.unsqueeze(1)))
    with pytest.raises(ValueError, match="in_length"):
        build_model("cnn1d", in_length=8)


def test_cnn1d_learns_a_simple_task() -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 40)
    y = (x[:, :20].sum(1) > x[:, 20:].sum(1)).long()
    model = build_model("cnn1d", num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert (model(x).argmax(1) == y).float().mean() > 0.95


def test_autoencoder_structure() -> None:
    model = build_model("autoencoder", in_features=784, widths=MNIST_WIDTHS, activation="sigmoid")
    assert isinstance(model, Autoencoder)
    enc = [(m.in_features, m.out_features) for m in model.encoder if isinstance(m, nn.Linear)]
    dec = [(m.in_features, m.out_features) for m in model.decoder if isinstance(m, nn.Linear)]
    assert enc == [(784, 1000), (1000, 500), (500, 250), (250, 30)]
    assert dec == [(30, 250), (250, 500), (500, 1000), (1000, 784)]
    # Linear code layer and raw (un-squashed) output.
    assert isinstance(model.encoder[-1], nn.Linear)
    assert isinstance(model.decoder[-1], nn.Linear)
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 6
    x = torch.rand(3, 1, 28, 28)
    assert model.encode(x).shape == (3, 30)
    assert model(x).shape == x.shape


def test_autoencoder_default_widths() -> None:
    model = build_model("autoencoder")
    sizes = [m.out_features for m in model.encoder if isinstance(m, nn.Linear)]
    assert sizes == [200, 100, 50, 10]


def test_convnet_has_the_benchmark_shapes() -> None:
    shapes = [tuple(p.shape) for p in build_model("convnet").parameters()]
    assert shapes == [
        (32, 3, 3, 3),
        (32,),
        (64, 32, 3, 3),
        (64,),
        (256, 4096),
        (256,),
        (10, 256),
        (10,),
    ]
