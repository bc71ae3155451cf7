"""The large-batch workload's measurement script: its quick mode end to end (a real trainer
run through the preset), and the committed report rebuilt from results.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.large_batch_workload import OUT, main, noise_scale_at, parse_runs
from benchmarks.report import NOTES
from secondorder.data.teacher_student_data import teacher_student_bayes


def test_runs_parse_and_noise_scale_is_read_at_or_before_a_step() -> None:
    assert parse_runs("adamw:8192:0.003,kfac:2048:0.1") == [
        ("adamw", 8192, 0.003),
        ("kfac", 2048, 0.1),
    ]
    run = {"train": {"step": [2, 4, 6], "noise_scale": [10.0, 20.0, 30.0]}}
    assert noise_scale_at(run, 1) is None
    assert noise_scale_at(run, 4) == 20.0 and noise_scale_at(run, 5) == 20.0
    assert noise_scale_at(run, 100) == 30.0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_mode_writes_the_curve_report_and_plot(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path), "--set", "trainer.seed=3"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    script = "python -m benchmarks.large_batch_workload"
    assert results["command"] == f"{script} --quick --out {tmp_path} --set trainer.seed=3"
    (run,) = results["runs"]
    assert run["batch"] == 512 and run["micro_batch"] == 64 and run["optimizer"] == "adamw"
    assert run["seed"] == 3 and "run_dir" not in run["command"]
    assert run["config"]["trainer"]["run_dir"] == "runs/adamw-b512-lr0.003"
    assert run["command"].endswith("trainer.max_steps=8 trainer.eval_every=4 trainer.seed=3")
    assert run["train"]["step"] == [2, 4, 6, 8] and run["eval"]["step"] == [4, 8]
    for value, trace, grad_sq in zip(
        run["train"]["noise_scale"], run["train"]["trace"], run["train"]["grad_sq"], strict=True
    ):
        assert value == pytest.approx(trace / grad_sq, rel=1e-4)
    data = run["config"]["data"]
    keys = ("num_samples", "eval_samples", "input_dim", "teacher_width", "teacher_depth")
    keys += ("num_classes", "temperature", "seed")
    assert results["bayes"] == teacher_student_bayes(**{k: data[k] for k in keys})
    readme = (tmp_path / "README.md").read_text()
    assert "| adamw | 512 | 0.003 | not reached | - | - |" in readme
    assert (tmp_path / "noise_scale.png").stat().st_size > 0


def test_committed_report_rebuilds_from_results_alone(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_bytes((OUT / "results.json").read_bytes())
    assert main(["--report-only", "--out", str(tmp_path)]) == 0
    rebuilt = (tmp_path / "README.md").read_text().split(NOTES)[0]
    assert rebuilt == (OUT / "README.md").read_text().split(NOTES)[0]
    header = (tmp_path / "noise_scale.png").read_bytes()[:24]
    assert header[16:24] == (OUT / "noise_scale.png").read_bytes()[16:24]  # same width, height


def test_committed_curve_reaches_the_large_batch_regime() -> None:
    """The workload's claim: the first run reached the preset's target, and B_simple there is at
    least 8192."""
    results = json.loads((OUT / "results.json").read_text())
    first = results["runs"][0]
    assert first["status"] == "target_reached"
    assert noise_scale_at(first, first["steps_to_target"]) >= 8192
