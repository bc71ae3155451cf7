"""Curvature workers on two ranks through the real launchers, under both backends: with
inversion workers that never run stale (``max_staleness=0``) two ranks end with the weights of
one rank without workers; with statistics workers the ranks stay identical (checked every step)
and fold their workers' statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, small_run_overrides, train

from secondorder.distributed.testing import horovodrun_path

KFAC = (
    "optimizer=kfac",
    "optimizer.factor_update_every=2",
    "optimizer.inverse_update_every=3",
    "trainer.max_micro_batch=16",
)
# One rank with 4 micro-batches and two with 2 each draw true-Fisher samples in another order;
# the empirical Fisher makes the two runs comparable (sampling is covered in test_kfac_*).
EMPIRICAL = (*KFAC, "optimizer.fisher_type=empirical")


def _launch(backend: str, overrides: list[str]) -> None:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    if backend == "torch":
        env.update(NPROC="2", TORCHRUN=str(Path(sys.executable).with_name("torchrun")))
        command = ["bash", str(REPO / "launch" / "torchrun.sh"), *overrides, "distributed=torch"]
    else:
        env["HOROVODRUN"] = horovodrun_path() or "horovodrun"
        command = [
            "bash",
            str(REPO / "launch" / "horovodrun.sh"),
            "-np",
            "2",
            *overrides,
            "distributed=horovod",
        ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_two_ranks_with_inversion_workers_equal_one_rank(
    tmp_path: Path, data_root: Path, backend: str
) -> None:
    _, single = train(
        [*small_run_overrides(tmp_path / "one", data_root, *EMPIRICAL), "distributed=none"]
    )
    workers = ("workers=async", "workers.max_staleness=0", "distributed.verify_every=4")
    _launch(backend, small_run_overrides(tmp_path / "two", data_root, *EMPIRICAL, *workers))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    double = torch.load(tmp_path / "two" / "final_model.pt", weights_only=True)
    for name, tensor in single.items():
        torch.testing.assert_close(double[name], tensor, rtol=1e-5, atol=1e-6)
    last = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-2])
    assert last["inverse_staleness"] == 0 and last["inverse_fallbacks"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_two_ranks_with_statistics_workers_stay_identical(
    tmp_path: Path, data_root: Path, backend: str
) -> None:
    stats = (
        "workers=async",
        "workers.stats.num_processes=1",
        "workers.stats.batch_size=32",
        "workers.stats.refresh_every=2",
        "distributed.verify_every=1",
    )
    _launch(backend, small_run_overrides(tmp_path / "two", data_root, *KFAC, *stats))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    train_records = [r for r in records if "train_loss" in r]
    assert train_records[-1]["stats_results"] >= 2
    assert train_records[-1]["time_factors_s"] >= 0 and train_records[-1]["stats_errors"] == 0
