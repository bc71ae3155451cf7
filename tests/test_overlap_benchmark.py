"""The ``overlap`` benchmark suite on hand-written run records: intervals read from
metrics.jsonl, medians, the hidden fraction the scaling tool reads, the report rebuilt from
``results.json`` alone, and the suite's runs composing into valid 2-rank configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import compose_config

from benchmarks.overlap_suite import intervals, settings, summary, train_command
from benchmarks.run import SUITES, main
from secondorder.config import validate


def test_intervals_leave_out_the_warm_up_and_evaluation_records(tmp_path: Path) -> None:
    records = [
        {"step": 2, "comm_wait_s": 0.5, "elapsed_s": 10.0},
        {"step": 4, "comm_wait_s": 0.02, "elapsed_s": 11.0},
        {"step": 6, "comm_wait_s": 0.04, "elapsed_s": 11.6},
        {"step": 6, "eval_loss": 1.0, "elapsed_s": 12.0},
        {"step": 8, "comm_wait_s": 0.03, "elapsed_s": 12.4},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    got = intervals(tmp_path, warmup_steps=4)
    assert got == {"step": [6, 8], "comm_wait_s": [0.04, 0.03], "step_s": [0.3, 0.4]}


def _runs() -> list[dict]:
    return [
        {"round": 0, "overlap": True, "comm_wait_s": [0.010, 0.030, 0.020], "step_s": [1, 2, 3]},
        {"round": 0, "overlap": False, "comm_wait_s": [0.100, 0.080], "step_s": [2.0, 2.0]},
        {"round": 1, "overlap": False, "comm_wait_s": [0.050], "step_s": [4.0]},
        {"round": 1, "overlap": True, "comm_wait_s": [0.040], "step_s": [1.0]},
    ]


def test_summary_is_the_median_over_rounds_of_each_runs_median() -> None:
    s = summary(_runs())
    # on: run medians 0.020 and 0.040 -> 0.030; off: 0.090 and 0.050 -> 0.070.
    assert s["comm_wait_s_on"] == pytest.approx(0.030)
    assert s["comm_wait_s_off"] == pytest.approx(0.070)
    assert s["step_s_on"] == pytest.approx(1.5) and s["step_s_off"] == pytest.approx(3.0)
    assert s["wait_ratio"] == pytest.approx(3 / 7)
    assert s["hidden_fraction"] == pytest.approx(4 / 7)


def test_report_only_rebuilds_the_table_from_results_alone(tmp_path: Path, capsys) -> None:
    spec = yaml.safe_load((SUITES / "overlap.yaml").read_text())
    results = {
        "suite": "overlap",
        "quick": False,
        "command": "python -m benchmarks.run overlap",
        "machine": "test machine",
        "settings": settings(spec, quick=False),
        "runs": _runs(),
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["overlap", "--report-only", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    text = (tmp_path / "README.md").read_text()
    assert "| true | 30.00 | 1500.00 |" in text and "| false | 70.00 | 3000.00 |" in text
    assert "0.43 (goal at most 0.50: met)" in text and "test machine" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["hidden_fraction"] == pytest.approx(4 / 7)  # what --hidden-from reads
    assert not list(tmp_path.glob("runs"))


@pytest.mark.parametrize("quick", [False, True])
def test_suite_runs_compose_for_two_ranks(quick: bool, tmp_path: Path) -> None:
    spec = yaml.safe_load((SUITES / "overlap.yaml").read_text())
    run = settings(spec, quick=quick)
    for overlap in (True, False):
        command = train_command(run, overlap=overlap, run_dir=tmp_path)
        overrides = command[command.index("secondorder.train") + 1 :]
        config = validate(compose_config(overrides), world_size=run["nproc"])
        assert config.distributed.overlap is overlap and config.optimizer.name == "sgd"
        assert config.model.name == "resnet20"
        if not quick:
            assert config.data.batch_size == 256 * run["nproc"]
    traffic = Path(spec["projection"]["args"][1])
    assert (Path(__file__).resolve().parents[1] / traffic).is_file()
