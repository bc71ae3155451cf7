"""Batch scaling v2: the fit of S(B) = S_min (1 + B_crit / B), the learning-rate search with its
equal trial budget and step caps, and the quick suite end to end through the real trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import batch_scaling_v2 as suite
from benchmarks.batch_scaling_v2_report import fit_scaling, fit_with_intervals
from benchmarks.run import SUITES, main

BATCHES = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


def _steps(s_min: float, b_crit: float, batch: float) -> float:
    return s_min * (1.0 + b_crit / batch)


def test_fit_recovers_the_parameters_of_exact_data() -> None:
    steps = [_steps(220.0, 9000.0, b) for b in BATCHES]
    s_min, b_crit, rms = fit_scaling(BATCHES, steps)
    # The grid of log10 B_crit has steps of 0.005 (1.2%): the fit lands on the nearest point.
    assert b_crit == pytest.approx(9000.0, rel=0.012)
    assert s_min == pytest.approx(220.0, rel=0.012)
    assert rms < 0.01


def test_fit_is_least_squares_in_log_space() -> None:
    """Against a brute-force float64 minimisation of the same objective over both parameters."""
    rng = np.random.default_rng(1)
    steps = [_steps(150.0, 3000.0, b) * math.exp(rng.normal(0, 0.1)) for b in BATCHES]
    s_min, b_crit, _ = fit_scaling(BATCHES, steps)

    def loss(a: float, k: float) -> float:
        pairs = zip(BATCHES, steps, strict=True)
        return sum((math.log(s) - math.log(a * (1 + k / b))) ** 2 for b, s in pairs)

    best = min(
        (loss(a, k), a, k)
        for a in np.geomspace(50, 400, 300)
        for k in np.geomspace(300, 30000, 300)
    )
    assert loss(s_min, b_crit) <= best[0] + 1e-9
    assert b_crit == pytest.approx(best[2], rel=0.05)


def test_bootstrap_intervals_cover_the_truth_and_need_three_batches() -> None:
    rng = np.random.default_rng(0)
    points = [
        (b, round(_steps(200.0, 8000.0, b) * math.exp(rng.normal(0, 0.08))))
        for b in BATCHES
        for _ in range(3)
    ]
    fitted = fit_with_intervals(points)
    assert fitted is not None
    low, high = fitted["B_crit_interval"]
    assert low < 8000.0 < high and low < fitted["B_crit"] < high
    low, high = fitted["S_min_interval"]
    assert low < 200.0 < high
    assert fitted["points"] == 24 and fitted["batches"] == BATCHES
    assert fit_with_intervals([(512, 100), (512, 110), (1024, 60)]) is None


def _row(lr: float, steps: int | None, loss: float = 0.8, status: str = "completed") -> dict:
    return {"lr": lr, "steps_to_target": steps, "final_eval_loss": loss, "status": status}


def test_better_prefers_reached_then_fewer_steps_then_lower_loss() -> None:
    assert suite.better(_row(1, 100), None)
    assert suite.better(_row(1, 90), _row(2, 100))
    assert not suite.better(_row(1, 100), _row(2, 100))  # a tie keeps the earlier trial
    assert suite.better(_row(1, 500), _row(2, None, 0.7))
    assert not suite.better(_row(1, None, 0.7), _row(2, 500))
    assert suite.better(_row(1, None, 0.79), _row(2, None, 0.8))
    assert not suite.better(_row(1, None, 0.1, "diverged"), _row(2, None, 0.8))
    assert suite.better(_row(1, None, 0.9), _row(2, None, float("nan")))


def _plan() -> suite.Plan:
    return suite.Plan.load(SUITES / "batch_scaling_v2.yaml", quick=False, max_seeds=None)


@pytest.mark.parametrize(
    ("optimum", "expected"),
    [(0.004, [0.001, 0.002, 0.004]), (0.0005, [0.001, 0.002, 0.0005])],
)
def test_search_moves_towards_the_better_side_with_three_trials_and_caps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimum: float, expected: list[float]
) -> None:
    """Steps grow with the distance from an optimum learning rate; each trial's cap is the best
    steps so far (the full cap for the first)."""
    calls: list[tuple[float, int, str]] = []

    def fake(plan: Any, out: Any, opt: str, batch: int, lr: float, seed: int, cap: int, role: str):
        calls.append((lr, cap, role))
        steps = round(100 * (1 + abs(math.log2(lr / optimum))))
        return _row(lr, steps if steps <= cap else None)

    monkeypatch.setattr(suite, "run_trial", fake)
    plan = _plan()
    trials = suite.search(plan, tmp_path, "adamw", 8192, 0.001)
    assert [lr for lr, _, _ in calls] == expected
    full = plan.points[8192]["max_steps"]
    first = round(100 * (1 + abs(math.log2(0.001 / optimum))))
    second = round(100 * (1 + abs(math.log2(0.002 / optimum))))
    assert [cap for _, cap, _ in calls] == [full, first, min(first, second)]
    assert [role for _, _, role in calls] == ["tune1", "tune2", "tune3"]
    assert len(trials) == plan.trials == 3


def test_every_optimizer_gets_the_same_search(tmp_path: Path) -> None:
    plan = _plan()
    assert plan.trials == 3 and len(plan.seeds) == 3
    assert sorted(plan.points) == BATCHES
    assert set(plan.optimizers) >= {"adamw", "kfac", "shampoo", "soap"}
    for spec in plan.optimizers.values():
        assert set(spec) <= {"overrides", "lr", "tied", "batches"}  # no extra trials


def test_tied_settings_scale_with_the_square_of_the_rate() -> None:
    spec = {"overrides": [], "lr": 0.01, "tied": {"optimizer.kl_clip": 1e-4}}
    assert suite.tied_overrides(spec, 0.01) == ["optimizer.kl_clip=0.0001"]
    assert suite.tied_overrides(spec, 0.04) == ["optimizer.kl_clip=0.0016"]
    assert suite.tied_overrides(spec, 0.005) == ["optimizer.kl_clip=2.5e-05"]
    assert suite.tied_overrides({"overrides": [], "lr": 1.0}, 2.0) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_suite_runs_through_the_trainer(tmp_path: Path) -> None:
    assert (
        main(["batch_scaling_v2", "--quick", "--optimizers", "adamw", "--out", str(tmp_path)]) == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    cells = results["optimizers"]["adamw"]
    assert sorted(cells, key=int) == ["512", "1024"]
    for batch, cell in cells.items():
        assert [t["role"] for t in cell["trials"]] == ["tune1", "tune2", "tune3"]
        assert all(t["batch"] == int(batch) for t in cell["trials"])
        assert f"data.batch_size={batch}" in cell["trials"][0]["command"]
        assert cell["best_lr"] in [t["lr"] for t in cell["trials"]]
    # The search at 1024 starts from the best rate at 512.
    assert cells["1024"]["trials"][0]["lr"] == cells["512"]["best_lr"]
    assert results["fits"] == {}  # two batch sizes cannot determine B_crit
    readme = (tmp_path / "README.md").read_text()
    assert "| adamw | 512 |" in readme and (tmp_path / "scaling.png").stat().st_size > 0
    # Started again, every run is kept (same commands): nothing new is trained.
    stamps = {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/*/*/summary.json")}
    assert (
        main(["batch_scaling_v2", "--quick", "--optimizers", "adamw", "--out", str(tmp_path)]) == 0
    )
    assert {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/*/*/summary.json")} == stamps


def test_an_optimizer_runs_only_its_listed_batches_each_search_from_the_last_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan()
    plan.optimizers["probe"] = {"overrides": [], "lr": 0.1, "batches": [4096, 16384]}
    plan.seeds = [0, 1]
    calls: list[tuple[int, float, int, str]] = []

    def fake(plan: Any, out: Any, opt: str, batch: int, lr: float, seed: int, cap: int, role: str):
        calls.append((batch, lr, seed, role))
        return _row(lr, 100 if lr == 0.2 else 150)  # 2x the centre wins at every batch

    monkeypatch.setattr(suite, "run_trial", fake)
    suite.run_optimizer(plan, tmp_path, "probe")
    assert calls == [
        (4096, 0.1, 0, "tune1"),
        (4096, 0.2, 0, "tune2"),
        (4096, 0.4, 0, "tune3"),
        (4096, 0.2, 1, "seed"),
        (16384, 0.2, 0, "tune1"),
        (16384, 0.4, 0, "tune2"),
        (16384, 0.1, 0, "tune3"),
        (16384, 0.2, 1, "seed"),
    ]
