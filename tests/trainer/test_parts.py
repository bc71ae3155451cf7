"""The Trainer runs from parts made by hand, without the builder or a config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from secondorder.data import Task, synthetic
from secondorder.data.sampler import GlobalBatchSampler, plan_batches
from secondorder.distributed.comm import NoComm
from secondorder.trainer import DataFeed, RunOutput, RunParts, Trainer, TrainerSettings


def test_trainer_runs_from_hand_made_parts(tmp_path: Path) -> None:
    data = synthetic(num_samples=128, eval_samples=32, shape=[6], num_classes=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = plan_batches(global_batch=32, world_size=1, max_micro_batch=16)
    sampler = GlobalBatchSampler(num_samples=len(data.train), plan=plan, rank=0, seed=0)
    trainer = Trainer(
        TrainerSettings(max_steps=8, eval_every=4, log_every=4, progress=False),
        RunParts(model, optimizer, NoComm(), torch.device("cpu")),
        DataFeed(data.train, data.eval, Task(), sampler),
        RunOutput(tmp_path, {"model": "linear", "optimizer": "sgd", "data": "synthetic"}),
    )
    summary = trainer.fit()
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert (summary["micro_batch_size"], summary["accumulation_steps"]) == (16, 2)
    assert 0.0 <= summary["final_eval_accuracy"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["epoch"] == 4 / sampler.steps_per_epoch  # 4 steps per epoch of 128
    assert (tmp_path / "final_model.pt").exists()
