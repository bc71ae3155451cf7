"""The large-batch preset: it composes to the measured workload, its target is the teacher's own
eval loss plus the chosen margin, and it trains (two steps, with the noise-scale meter on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config, train

from secondorder.config import validate
from secondorder.data.teacher_student_data import teacher_student_bayes

# The target's distance above the teacher's eval loss (chosen by measurement, see
# benchmarks/results/large_batch_workload/README.md).
MARGIN = 0.05


def test_preset_composes_to_the_measured_workload() -> None:
    run = validate(compose_config(["experiment=large_batch"]))
    assert run.data.name == "teacher_student" and run.model.name == "mlp"
    assert run.optimizer.name == "adamw" and run.data.batch_size == 8192
    assert run.model.kwargs["in_features"] == run.data.kwargs["input_dim"]
    assert run.trainer.target.metric == "eval_loss"
    teacher = teacher_student_bayes(**run.data.kwargs)["eval_loss"]
    assert run.trainer.target.value == pytest.approx(teacher + MARGIN, abs=5e-5)
    # One pass over the training split covers the whole run: no example is seen twice.
    assert run.data.batch_size * run.trainer.max_steps <= run.data.kwargs["num_samples"]


def test_preset_runs_two_steps_with_the_noise_scale(tmp_path: Path) -> None:
    summary, weights = train(
        [
            "experiment=large_batch",
            "data.batch_size=256",
            "data.eval_samples=512",
            "trainer.max_micro_batch=64",
            "trainer.noise_scale_every=1",
            "trainer.max_steps=2",
            "trainer.eval_every=2",
            "trainer.log_every=1",
            "trainer.progress=false",
            f"trainer.run_dir={tmp_path / 'run'}",
            "logger=none",
        ]
    )
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["accumulation_steps"] == 4 and summary["final_eval_loss"] is not None
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "noise_scale" in r] == [1, 2]
    assert "0.weight" not in weights and "1.weight" in weights  # Flatten, then the first Linear


def test_kfac_preset_is_the_workload_with_the_chosen_kfac_settings() -> None:
    workload = validate(compose_config(["experiment=large_batch", "optimizer=kfac"]))
    run = validate(compose_config(["experiment=large_batch_kfac"]))
    assert run.data == workload.data and run.model == workload.model
    assert run.trainer == workload.trainer
    chosen = {"lr": 0.1, "kl_clip": 1e-4, "factor_update_every": 5, "inverse_update_every": 10}
    assert run.optimizer.name == "kfac" and run.optimizer.kwargs["weight_decay"] == 0.0
    for key, value in chosen.items():
        assert run.optimizer.kwargs[key] == value, key
        assert workload.optimizer.kwargs[key] != value, key  # not the package's defaults
