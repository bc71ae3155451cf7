"""Data parallelism through the real entry point: 2 gloo ranks equal 1 rank on the same global
batch, and the `make demo` command reaches its target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config, small_run_overrides, train

from secondorder.distributed.testing import run_on_ranks


def _train_on_rank(overrides: list[str]) -> dict[str, torch.Tensor] | None:
    from secondorder.train import run

    summary = run(compose_config(overrides))
    if int(os.environ["RANK"]) != 0:
        return None
    return torch.load(Path(summary["run_dir"]) / "final_model.pt", weights_only=True)


@pytest.mark.parametrize("optimizer", ["sgd", "lamb"])
def test_two_ranks_equal_one_rank(tmp_path: Path, data_root: Path, optimizer: str) -> None:
    extra = (f"optimizer={optimizer}", "trainer.max_micro_batch=16", "distributed.verify_every=4")
    single = run_on_ranks(
        _train_on_rank,
        world_size=1,
        args=([*small_run_overrides(tmp_path / "one", data_root, *extra), "distributed=none"],),
        timeout_s=120,
    )[0]
    double = run_on_ranks(
        _train_on_rank,
        world_size=2,
        args=([*small_run_overrides(tmp_path / "two", data_root, *extra), "distributed=torch"],),
        timeout_s=120,
    )[0]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["accumulation_steps"] == 2
    for name, tensor in single.items():
        torch.testing.assert_close(double[name], tensor, rtol=1e-5, atol=1e-6)


def test_comm_bytes_is_the_gradient_payload(tmp_path: Path, data_root: Path) -> None:
    """``comm_bytes`` in metrics.jsonl is the communicator's count of a training step: for SGD
    the closure's two all-reduces, gradients (accumulated locally over the micro-batches, sent
    once) and the float32 loss; nothing on one process. What evaluation, checkpoints, parameter
    checks and the stop-signal vote send is not a step's and must not show up."""
    extra = (
        "optimizer=sgd",
        "trainer.max_micro_batch=16",  # 2 micro-batches per rank on 2 ranks
        "trainer.checkpoint_every=4",
        "distributed.verify_every=4",
    )
    train([*small_run_overrides(tmp_path / "one", data_root, *extra), "distributed=none"])
    overrides = [*small_run_overrides(tmp_path / "two", data_root, *extra), "distributed=torch"]
    weights = run_on_ranks(_train_on_rank, world_size=2, args=(overrides,), timeout_s=120)[0]
    # cnn1d has no buffers: its state_dict is its parameters, all float32.
    assert all(t.dtype == torch.float32 for t in weights.values())
    gradient_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    for run, per_step in (("one", 0.0), ("two", float(gradient_bytes + 4))):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        steps = [r for r in records if "train_loss" in r]
        assert [r["step"] for r in steps] == [3, 6, 9, 12]
        assert all("comm_bytes" not in r for r in records if "eval_loss" in r)
        assert [r["comm_bytes"] for r in steps] == [per_step] * 4, run


@pytest.mark.slow
def test_demo_command_reaches_its_target(tmp_path: Path) -> None:
    """The command `make demo` runs (see Makefile), with its own data cache and run dir."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SECONDORDER_DATA=str(tmp_path / "data"))
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "secondorder.train",
            "experiment=demo",
            f"trainer.run_dir={tmp_path / 'demo'}",
            "logger=none",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["status"] == "target_reached"
    assert summary["world_size"] == 2
    assert summary["final_eval_accuracy"] >= summary["target"]["value"]
    assert "| status" in result.stdout  # the closing table
