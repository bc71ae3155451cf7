"""The ImageNet reference experiments: each composes to its published recipe and runs two steps
on a small generated ImageNet folder with every recipe option kept (batch, image size and
length overridden for speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config, train

from secondorder.config import validate
from secondorder.data.generate_imagenet import main as generate_imagenet
from secondorder.trainer.schedules import make_schedule
from secondorder.trainer.settings import in_steps

EXPERIMENTS = ["imagenet_resnet50_sgd", "imagenet_resnet50_lars", "imagenet_resnet50_kfac"]

# name -> (optimizer, global batch, learning rate after scaling, epochs, recipe keys)
RECIPES = {
    "imagenet_resnet50_sgd": ("sgd", 8192, 3.2, 90, {"momentum": 0.9, "weight_decay": 1e-4}),
    "imagenet_resnet50_lars": ("lars", 32768, 29.0, 64, {"momentum": 0.929, "eps": 0.0}),
    "imagenet_resnet50_kfac": (
        "kfac",
        2048,
        0.8,
        55,
        {"damping": 1e-3, "factor_update_every": 10, "inverse_update_every": 100},
    ),
}
IMAGENET_TRAIN = 1_281_167


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_to_its_recipe(name: str) -> None:
    optimizer, batch, lr, epochs, keys = RECIPES[name]
    run = validate(compose_config([f"experiment={name}"]), world_size=batch // 256)
    assert run.model.name == "resnet50" and run.data.name == "imagenet"
    assert run.optimizer.name == optimizer and run.data.batch_size == batch
    scaled = run.optimizer.kwargs["lr"] * (batch / 256 if run.trainer.scale_lr else 1)
    assert scaled == pytest.approx(lr)
    assert run.trainer.max_epochs == epochs
    assert run.optimizer.kwargs["exclude_norm_and_bias_from_weight_decay"] is True
    for key, value in keys.items():
        assert run.optimizer.kwargs[key] == value, key
    assert run.trainer.label_smoothing == (0.0 if optimizer == "sgd" else 0.1)
    # The schedule over ImageNet's real epoch length.
    steps_per_epoch = IMAGENET_TRAIN // batch
    trainer = in_steps(run.trainer, steps_per_epoch=steps_per_epoch)
    assert trainer.max_steps == epochs * steps_per_epoch
    f = make_schedule(trainer.lr_schedule, total_steps=trainer.max_steps)
    if name == "imagenet_resnet50_sgd":  # 5 warm-up epochs; x0.1 at 30, 60, 80
        assert trainer.lr_schedule.warmup_steps == 5 * steps_per_epoch
        assert f(5 * steps_per_epoch) == 1.0
        assert f(30 * steps_per_epoch) == pytest.approx(0.1)
        assert f(80 * steps_per_epoch) == pytest.approx(1e-3)
    if name == "imagenet_resnet50_lars":  # 18 warm-up epochs, poly(2) to 1e-4
        assert trainer.lr_schedule.warmup_steps == 18 * steps_per_epoch
        assert f(trainer.max_steps) * 29.0 == pytest.approx(1e-4)


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    assert generate_imagenet([str(root), "--classes", "4", "--train-per-class", "4"]) == 0
    return root


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_two_steps(name: str, tmp_path: Path, tiny_imagenet: Path) -> None:
    overrides = [
        f"experiment={name}",
        f"data.root={tiny_imagenet}",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.image_size=32",
        "data.eval_resize=36",
        "data.num_workers=0",
        "trainer.max_epochs=null",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=2",
        "trainer.threads=1",
        "trainer.progress=false",
        "trainer.target.metric=null",
        "trainer.target.value=null",
        f"trainer.run_dir={tmp_path / 'run'}",
        "logger=none",
    ]
    if name == "imagenet_resnet50_kfac":
        # Eigendecompositions of the 1024- and 2048-wide factors of stages 3-4 take most of a
        # minute on one CPU core: those stages take the plain gradient here.
        overrides.append("optimizer.exclude=[layer3.*,layer4.*]")
    summary, weights = train(overrides)
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["final_train_loss"] is not None and "fc.weight" in weights
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert any("eval_accuracy" in r for r in records)
