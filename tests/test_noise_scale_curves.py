"""The noise-scale exploration script end to end in its quick mode: a real trainer run, the curve
file and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.noise_scale_curves import main


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_curve_is_written(tmp_path: Path, data_root: Path, monkeypatch) -> None:
    monkeypatch.setenv("SECONDORDER_DATA", str(data_root))
    assert main(["--quick", "--workloads", "mnist1d_cnn_10k", "--out", str(tmp_path)]) == 0
    curves = json.loads((tmp_path / "noise_scale_curves.json").read_text())
    train = curves["mnist1d_cnn_10k"]["train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for record in train:
        assert record["noise_scale"] == pytest.approx(
            record["noise_scale_trace"] / record["noise_scale_grad_sq"]
        )
    assert curves["mnist1d_cnn_10k"]["eval"]
    assert (tmp_path / "noise_scale_curves.png").stat().st_size > 0
