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
