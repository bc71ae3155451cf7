"""Every config group composes and builds; a user's config mistake stops the run with one
clear message naming the key, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config

from secondorder.config import ConfigError, validate
from secondorder.data import build_data
from secondorder.models import build_model
from secondorder.optim import OptimContext, build_optimizer

CONFIGS = REPO / "configs"


# A model that reads each data set and vice versa: validation checks that the two fit (the
# defaults are cnn1d and mnist1d).
IMAGE_MODELS = ("convnet", "resnet20", "resnet18", "resnet50")
MODEL_FOR_DATA = {
    "cifar10": "resnet20",
    "imagenet": "resnet50",
    "synthetic": "convnet",
    "teacher_student": "mlp",
}
# Data sets drawn from a seed alone: no files, no root.
GENERATED_DATA = ("synthetic", "teacher_student")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_group_has_its_documented_options() -> None:
    assert {"mlp", "cnn1d", "autoencoder", "resnet20", "resnet18", "resnet50"} <= set(
        options("model")
    )
    assert {"mnist1d", "synthetic", "cifar10", "imagenet"} <= set(options("data"))
    assert {"sgd", "adamw", "lars", "lamb"} <= set(options("optimizer"))
    assert {"none", "torch"} <= set(options("distributed"))
    assert {"wandb", "none"} <= set(options("logger"))
    assert "demo" in options("experiment") and options("debug")


@pytest.mark.parametrize("model", options("model"))
def test_every_model_composes_and_builds(model: str) -> None:
    data = ["data=synthetic"] if model in IMAGE_MODELS else []
    run = validate(compose_config([f"model={model}", *data]))
    net = build_model(run.model.name, **run.model.kwargs)
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_every_optimizer_composes_and_builds(optimizer: str) -> None:
    run = validate(compose_config([f"optimizer={optimizer}"]))
    net = build_model(run.model.name, **run.model.kwargs)
    context = OptimContext(model=net, loss_kind=run.model.loss)
    opt = build_optimizer(run.optimizer.name, net.parameters(), context, **run.optimizer.kwargs)
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize("data", options("data"))
def test_every_dataset_composes(data: str, tmp_path: Path) -> None:
    root = [] if data in GENERATED_DATA else [f"data.root={tmp_path}"]
    model = [f"model={MODEL_FOR_DATA[data]}"] if data in MODEL_FOR_DATA else []
    run = validate(compose_config([f"data={data}", *root, *model]))
    assert run.data.name == data
    if data in ("mnist1d", *GENERATED_DATA):
        kwargs = dict(run.data.kwargs, num_samples=300)
        if data == "mnist1d":
            kwargs["progress"] = False
        bundle = build_data(data, **kwargs)
        assert len(bundle.train) > 0 and len(bundle.eval) > 0


@pytest.mark.parametrize(
    "group_option",
    [
        *(f"distributed={o}" for o in options("distributed")),
        *(f"logger={o}" for o in options("logger")),
        *(f"experiment={o}" for o in options("experiment")),
        *(f"debug={o}" for o in options("debug")),
    ],
)
def test_other_groups_compose(group_option: str) -> None:
    validate(compose_config([group_option]))


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        (["trainer.max_steps=abc"], 1, "trainer.max_steps: expected int"),
        (["optimizer.lr=-0.1"], 1, "optimizer.lr: must be positive"),
        (["optimizer.lr=0"], 1, "optimizer.lr: must be positive"),
        (["optimizer.momentum=fast"], 1, "optimizer.momentum: expected float"),
        (["+optimizer.betas=1"], 1, "optimizer.betas: unknown key; allowed keys"),
        (["trainer.device=tpu"], 1, "trainer.device: expected one of 'auto', 'cpu', 'cuda'"),
        (["trainer.precision=fp8"], 1, "trainer.precision: expected one of"),
        (["data.batch_size=250"], 4, "data.batch_size: data.batch_size=250 does not divide"),
        (["data.batch_size=0"], 1, "data.batch_size: must be a positive integer"),
        (["model.name=transformer"], 1, "model.name: unknown model 'transformer'; allowed"),
        (
            ["model=autoencoder", "trainer.target.metric=eval_accuracy", "trainer.target.value=1"],
            1,
            "trainer.target.metric: 'eval_accuracy' is not produced by a reconstruction task",
        ),
        (["trainer.target.metric=eval_accuracy"], 1, "set both metric and value"),
        (["trainer.target.metric=f1", "trainer.target.value=1"], 1, "trainer.target.metric"),
    ],
)
def test_config_mistakes_name_the_key(overrides: list[str], world_size: int, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides), world_size=world_size)
    assert message in str(err.value)


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "secondorder.train", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_config_error_is_one_message_without_traceback(tmp_path: Path) -> None:
    result = run_cli("optimizer.lr=-1", "logger=none", cwd=tmp_path)
    assert result.returncode == 2
    assert "optimizer.lr: must be positive" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists(), "no work (not even a run dir) before validation"


def test_cli_unknown_group_option_lists_the_choices(tmp_path: Path) -> None:
    result = run_cli("optimizer=adamax", cwd=tmp_path)
    assert result.returncode != 0
    assert "adamax" in result.stderr and "sgd" in result.stderr
    assert "Traceback" not in result.stderr
