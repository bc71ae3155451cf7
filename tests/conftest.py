"""Shared test helpers: compose the real Hydra config and run the real entry point in-process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_module(config_module="secondorder.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def small_run_overrides(run_dir: Path | str, data_root: Path | str, *extra: str) -> list[str]:
    """A seconds-long MNIST-1D run with no wandb and no progress bar."""
    return [
        f"trainer.run_dir={run_dir}",
        f"data.root={data_root}",
        "data.num_samples=1200",
        "data.progress=false",
        "data.batch_size=64",
        "trainer.max_steps=12",
        "trainer.eval_every=6",
        "trainer.log_every=3",
        "trainer.progress=false",
        "trainer.threads=1",
        "logger=none",
        *extra,
    ]


def train(overrides: list[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run ``secondorder.train.run`` on the composed config; return summary and final weights."""
    from secondorder.train import run

    cfg = compose_config(overrides)
    summary = run(cfg)
    weights = torch.load(Path(summary["run_dir"]) / "final_model.pt", weights_only=True)
    return summary, weights


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MNIST-1D cache for the whole session (generation is the slow part)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))
    monkeypatch.setenv("WANDB_SILENT", "true")
