"""Stops, signals, exit codes and float16 divergence.

The stop tests send real signals to the training process from inside a step (a wrapper around
``Trainer._train_step``), so the handler, the per-step agreement of the ranks, the checkpoint
and the resume are the code a scheduler's SIGTERM goes through.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, compose_config, small_run_overrides
from reference.preset_runs import PRESETS

from secondorder.distributed.testing import run_on_ranks
from secondorder.train import run
from secondorder.trainer.trainer import Trainer


def _signal_at(step: int, *signals: int, pause_s: float = 0.0) -> Any:
    """A ``Trainer._train_step`` that sends ``signals`` to this process when ``step`` is done."""
    original = Trainer._train_step

    def train_step(self: Trainer) -> torch.Tensor | None:
        loss = original(self)
        if self.step == step:
            for n, sig in enumerate(signals):
                if n:
                    time.sleep(pause_s)
                os.kill(os.getpid(), sig)
        return loss

    return train_step


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without what depends on the wall clock."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in lines]


def _outcome(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("wall_s", "wall_to_target_s", "mean_data_wait_fraction", "run_dir"):
        summary.pop(key)
    return summary


# -- item 2: float16 divergence ------------------------------------------------------------------


def test_fp16_run_whose_steps_keep_overflowing_is_diverged(tmp_path: Path, data_root: Path) -> None:
    run_dir = tmp_path / "fp16"
    summary = run(
        compose_config(
            small_run_overrides(
                run_dir,
                data_root,
                "trainer.precision=fp16",
                "optimizer.lr=1e6",
                "trainer.max_steps=60",
                "trainer.log_every=1",
                "trainer.eval_every=0",
            )
        )
    )
    assert summary["status"] == "diverged", summary
    assert "loss scale" in summary["error"]
    assert summary["steps"] < 60 and summary["skipped_steps"] >= 17
    assert not (run_dir / "final_model.pt").exists()
    records = _records(run_dir)
    assert records[-1]["skipped_steps"] == summary["skipped_steps"]
    # Every record after the first step is of a skipped step: none shows a loss as its own.
    assert records[0]["train_loss"] is not None
    assert all(r["train_loss"] is None for r in records[1:])
    assert summary["final_train_loss"] is None


# -- item 3: a stop on an evaluation step leaves the run's record unchanged ----------------------


def _stopped_then_resumed(
    overrides: list[str], stop_at: int, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """Run with a SIGTERM during step ``stop_at``, then resume while the run says it stopped."""
    statuses = []
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_train_step", _signal_at(stop_at, signal.SIGTERM))
        summary = run(compose_config(overrides))
    statuses.append(summary["status"])
    while summary["status"] == "failed" and len(statuses) < 3:
        summary = run(compose_config([*overrides, "trainer.resume=auto"]))
        statuses.append(summary["status"])
    return statuses


@pytest.mark.parametrize("optimizer", PRESETS)
def test_stop_on_an_evaluation_step_leaves_the_record_unchanged(
    tmp_path: Path, data_root: Path, optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For every preset, with a target: stopped on evaluation step 4 and resumed, a run's
    metrics, evaluations, target step and summary are the uninterrupted run's."""
    common = (f"optimizer={optimizer}", "model=mlp", "model.hidden=[24,24]")
    common += ("trainer.max_steps=8", "trainer.eval_every=2", "trainer.log_every=1")
    targets = {
        # met at the stop's own evaluation: the stopped run must end there, target reached
        "met_at_stop": ("trainer.target.metric=eval_loss", "trainer.target.value=1e9"),
        # not met: the resumed run must record the evaluation of the stop's step
        "not_met": ("trainer.target.metric=eval_accuracy", "trainer.target.value=0.999"),
    }
    for name, target in targets.items():
        plain = small_run_overrides(tmp_path / f"{name}-plain", data_root, *common, *target)
        stopped = small_run_overrides(tmp_path / f"{name}-stopped", data_root, *common, *target)
        run(compose_config(plain))
        statuses = _stopped_then_resumed(stopped, 4, monkeypatch)
        if name == "met_at_stop":
            assert statuses == ["target_reached"], statuses
        else:
            assert statuses == ["failed", "completed"], statuses
        assert _records(tmp_path / f"{name}-stopped") == _records(tmp_path / f"{name}-plain")
        assert _outcome(tmp_path / f"{name}-stopped") == _outcome(tmp_path / f"{name}-plain")


# -- item 11: stops within one step, a second signal forces, the first one is recorded -----------


def _train_with_signal_on_rank_1(overrides: list[str], step: int) -> dict[str, Any]:
    if os.environ["RANK"] == "1":
        Trainer._train_step = _signal_at(step, signal.SIGTERM)
    return run(compose_config(overrides))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_signal_to_one_rank_stops_every_rank_after_that_step(
    tmp_path: Path, data_root: Path
) -> None:
    """A long log interval does not delay the stop: rank 1 alone gets SIGTERM during step 5 and
    both ranks stop after step 5, checkpointed, both recording the signal."""
    overrides = small_run_overrides(
        tmp_path / "run",
        data_root,
        "distributed=torch",
        "trainer.max_steps=400",
        "trainer.log_every=400",
        "trainer.eval_every=0",
    )
    summaries = run_on_ranks(
        _train_with_signal_on_rank_1, world_size=2, args=(overrides, 5), timeout_s=150
    )
    for summary in summaries:
        assert summary["status"] == "failed" and summary["steps"] == 5, summary
        assert summary["stop_signal"] == signal.SIGTERM
    assert (tmp_path / "run" / "checkpoints" / "step_00000005.pt").is_file()


def test_first_signal_is_recorded_and_a_second_forces_the_exit(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM, then SIGINT a moment later (not a duplicate delivery): the run leaves at once,
    without the stop's checkpoint, and its summary names SIGTERM."""
    run_dir = tmp_path / "run"
    overrides = small_run_overrides(run_dir, data_root, "trainer.max_steps=50")
    monkeypatch.setattr(
        Trainer, "_train_step", _signal_at(2, signal.SIGTERM, signal.SIGINT, pause_s=1.2)
    )
    with pytest.raises(KeyboardInterrupt):  # StopForced, which no `except Exception` takes
        run(compose_config(overrides))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 2
    assert summary["stop_signal"] == signal.SIGTERM
    assert "second signal" in summary["error"]
    assert not (run_dir / "checkpoints").exists()


def test_a_repeated_delivery_of_the_same_signal_is_one_request(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same SIGTERM delivered twice at once (by Slurm and by torchrun's agent) still stops
    the run cleanly with a checkpoint."""
    run_dir = tmp_path / "run"
    overrides = small_run_overrides(run_dir, data_root, "trainer.max_steps=50")
    monkeypatch.setattr(Trainer, "_train_step", _signal_at(2, signal.SIGTERM, signal.SIGTERM))
    summary = run(compose_config(overrides))
    assert summary["status"] == "failed" and summary["stop_signal"] == signal.SIGTERM
    assert (run_dir / "checkpoints" / "step_00000002.pt").is_file()


# -- item 10: under the launch wrappers a stopped run exits 128 + the signal ---------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["torchrun.sh", "horovodrun.sh"])
def test_sigterm_to_the_launch_wrapper_exits_143(
    tmp_path: Path, data_root: Path, launcher: str
) -> None:
    """torchrun's agent and horovodrun exit 1 when their ranks stop on a signal; the wrappers
    exit 128 + 15, so Slurm can requeue a preempted job and not a crashed one."""
    bin_dir = Path(sys.executable).parent
    if launcher == "horovodrun.sh":
        pytest.importorskip("horovod.torch")
    run_dir = tmp_path / "run"
    overrides = small_run_overrides(
        run_dir, data_root, "trainer.max_steps=100000", "trainer.eval_every=0"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2", "NP": "2", "PYTHON": sys.executable}
    env.update(TORCHRUN=str(bin_dir / "torchrun"), HOROVODRUN=str(bin_dir / "horovodrun"))
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / launcher), *overrides],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 150
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # the wrapper only, as `kill <pid>` or scancel would
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stop_signal"] == signal.SIGTERM
    assert list((run_dir / "checkpoints").glob("step_*.pt")), "the stopped run is resumable"
