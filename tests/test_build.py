"""The builder: single parts without a communicator or run directory, and a whole run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config, small_run_overrides

from secondorder.build import (
    build_data,
    build_model,
    build_optimizer,
    build_run,
    build_sampler,
    build_task,
    stats_source,
)
from secondorder.train import compose_run

SMALL_SYNTHETIC = [
    "data=synthetic",
    "data.shape=[40]",
    "data.num_samples=256",
    "data.eval_samples=32",
    "data.batch_size=64",
]


def test_parts_build_without_communicator_or_run_dir() -> None:
    run = compose_run(["model=mlp", "model.hidden=[8]", "optimizer=neumann", *SMALL_SYNTHETIC])
    data = build_data(run)
    sampler = build_sampler(run, len(data.train), world_size=2, rank=1)
    assert (sampler.plan.per_rank, sampler.steps_per_epoch) == (32, 4)
    model = build_model(run, torch.device("cpu"))
    again = build_model(run, torch.device("cpu"))
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # the weights depend only on trainer.seed
    optimizer = build_optimizer(run, model, steps_per_epoch=sampler.steps_per_epoch)
    assert optimizer.steps_per_epoch == 4


def test_scale_lr_applies_the_linear_rule() -> None:
    overrides = ["optimizer=sgd", "trainer.scale_lr=true", "trainer.base_batch_size=32"]
    run = compose_run([*overrides, *SMALL_SYNTHETIC])
    model = build_model(run, torch.device("cpu"))
    optimizer = build_optimizer(run, model)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2 * run.optimizer.kwargs["lr"])


def test_task_and_worker_recipe_follow_the_model_config() -> None:
    run = compose_run(["model=autoencoder", *SMALL_SYNTHETIC])
    task = build_task(run)
    assert (task.kind, task.loss, task.uses_labels) == ("reconstruction", "mse", False)
    model, batch, size = stats_source(run).build()
    x, targets = batch(torch.arange(4))
    assert size == 256 and targets is x  # statistics workers reconstruct too


def test_build_run_makes_the_trainer_of_the_config(tmp_path: Path, data_root: Path) -> None:
    cfg = compose_config(small_run_overrides(tmp_path / "run", data_root, "optimizer=adamw"))
    with build_run(cfg) as trainer:
        assert (tmp_path / "run" / "config.yaml").exists()
        assert trainer.names == {"model": "cnn1d", "optimizer": "adamw", "data": "mnist1d"}
        assert trainer.plan.global_batch == 64 and trainer.task.kind == "classification"
        assert type(trainer.optimizer).__name__ == "AdamW"
