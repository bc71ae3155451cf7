"""End-to-end runs of the real entry point on tiny MNIST-1D: outputs, resume, targets, failures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_config, small_run_overrides, train

from secondorder.train import run
from secondorder.trainer.checkpoint import CheckpointError, list_checkpoints
from secondorder.trainer.records import STATUSES, SUMMARY_KEYS


def test_outputs_contract(tmp_path: Path, data_root: Path) -> None:
    summary, weights = train(small_run_overrides(tmp_path / "run", data_root))
    run_dir = tmp_path / "run"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(on_disk)
    assert on_disk["status"] == "completed" and on_disk["status"] in STATUSES
    assert on_disk["steps"] == 12 and on_disk["samples_seen"] == 12 * 64
    assert on_disk["global_batch_size"] == 64 and on_disk["world_size"] == 1
    assert (run_dir / "config.yaml").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train_loss" in r]
    eval_records = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in train_records] == [3, 6, 9, 12]
    assert [r["step"] for r in eval_records] == [6, 12]
    for r in train_records:
        assert {"step", "epoch", "samples", "train_loss", "lr", "elapsed_s"} <= set(r)
        assert r["samples"] == r["step"] * 64
    assert on_disk["final_eval_accuracy"] == eval_records[-1]["eval_accuracy"]
    assert set(weights) == set(torch.load(run_dir / "final_model.pt", weights_only=True))


RESUMABLE = {
    "adamw": ("optimizer=adamw",),
    "neumann": ("optimizer=neumann", "optimizer.warmup_steps=3", "optimizer.reset_steps=4"),
    "curveball": ("optimizer=curveball",),
    "ggn_cg": ("optimizer=ggn_cg", "optimizer.cg_max_iters=5"),
    # Curvature workers (deterministic mode): the checkpoint holds the factors and the newest
    # decompositions, and the resumed run's workers start from them.
    "kfac_workers": (
        "optimizer=kfac",
        "workers=sync",
        "optimizer.factor_update_every=2",
        "optimizer.inverse_update_every=3",
    ),
    # Spawned inversion workers that are never stale compute what sync mode computes.
    "kfac_async_workers": (
        "optimizer=kfac",
        "workers=async",
        "workers.max_staleness=0",
        "optimizer.factor_update_every=2",
        "optimizer.inverse_update_every=3",
    ),
}


@pytest.mark.parametrize("optimizer", sorted(RESUMABLE))
def test_resume_is_bitwise_exact(tmp_path: Path, data_root: Path, optimizer: str) -> None:
    extra = (*RESUMABLE[optimizer], "trainer.checkpoint_every=4", "trainer.keep_checkpoints=2")
    _, straight = train(small_run_overrides(tmp_path / "straight", data_root, *extra))

    # Interrupted after 8 of 12 steps (constant lr here; the next test decays it).
    train(small_run_overrides(tmp_path / "split", data_root, *extra, "trainer.max_steps=8"))
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == [
        "step_00000004.pt",
        "step_00000008.pt",
    ]
    summary, resumed = train(
        small_run_overrides(tmp_path / "split", data_root, *extra, "trainer.resume=auto")
    )
    assert summary["steps"] == 12
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps), "a resumed run must not duplicate metric records"


def test_resume_with_schedule_and_momentum(tmp_path: Path, data_root: Path) -> None:
    extra = (
        "optimizer=sgd",
        "trainer.lr_schedule.name=cosine",
        "trainer.lr_schedule.warmup_steps=3",
        "trainer.checkpoint_every=5",
    )
    _, straight = train(small_run_overrides(tmp_path / "a", data_root, *extra))
    run_b = small_run_overrides(tmp_path / "b", data_root, *extra)
    # Interrupt after step 5 by keeping only that checkpoint, then resume from it.
    train(run_b)
    for path in list_checkpoints(tmp_path / "b")[1:]:
        path.unlink()
    _, resumed = train([*run_b, "trainer.resume=auto"])
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_checkpoint_from_another_setup_is_refused(tmp_path: Path, data_root: Path) -> None:
    run = small_run_overrides(tmp_path / "r", data_root, "trainer.checkpoint_every=6")
    train(run)
    with pytest.raises(CheckpointError, match="optimizer"):
        train([*run, "optimizer=adamw", "trainer.resume=auto"])
    with pytest.raises(CheckpointError, match="model.channels: checkpoint has 32, this run has 16"):
        train([*run, "model.channels=16", "trainer.resume=auto"])
    newest = list_checkpoints(tmp_path / "r")[-1]
    payload = torch.load(newest, weights_only=True)
    # Without the recorded options the state itself still refuses another architecture.
    unmarked = {**payload, "meta": {k: v for k, v in payload["meta"].items() if k != "fingerprint"}}
    torch.save(unmarked, tmp_path / "unmarked.pt")
    with pytest.raises(CheckpointError, match="model state does not fit"):
        train([*run, "model.channels=16", f"trainer.resume={tmp_path / 'unmarked.pt'}"])
    torch.save({**payload, "format": 1}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="another version of secondorder"):
        train([*run, f"trainer.resume={tmp_path / 'old.pt'}"])
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="cannot read"):
        train([*run, f"trainer.resume={newest}"])


def test_accumulation_equals_large_batch(tmp_path: Path, data_root: Path) -> None:
    _, whole = train(small_run_overrides(tmp_path / "whole", data_root, "optimizer=sgd"))
    summary, accumulated = train(
        small_run_overrides(
            tmp_path / "acc", data_root, "optimizer=sgd", "trainer.max_micro_batch=16"
        )
    )
    assert summary["accumulation_steps"] == 4 and summary["micro_batch_size"] == 16
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-5, atol=1e-6)


def test_target_stops_the_run(tmp_path: Path, data_root: Path) -> None:
    summary, _ = train(
        small_run_overrides(
            tmp_path / "t",
            data_root,
            "trainer.target.metric=eval_accuracy",
            "trainer.target.value=0.0",
        )
    )
    assert summary["status"] == "target_reached"
    assert summary["steps_to_target"] == 6 and summary["steps"] == 6
    assert summary["wall_to_target_s"] > 0


def test_divergence_is_reported(tmp_path: Path, data_root: Path) -> None:
    summary = run(
        compose_config(small_run_overrides(tmp_path / "d", data_root, "optimizer.lr=1.0e+12"))
    )
    assert summary["status"] == "diverged"
    assert "loss became" in summary["error"]
    assert summary["steps"] < 12
    assert not (tmp_path / "d" / "final_model.pt").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path: Path, data_root: Path, precision: str) -> None:
    summary, weights = train(
        small_run_overrides(tmp_path / precision, data_root, f"trainer.precision={precision}")
    )
    assert summary["status"] == "completed"
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_neumann_evaluates_and_saves_its_evaluation_weights(
    tmp_path: Path, data_root: Path
) -> None:
    run_dir = tmp_path / "n"
    _, final = train(
        small_run_overrides(
            run_dir,
            data_root,
            "optimizer=neumann",
            "optimizer.warmup_steps=3",
            "trainer.checkpoint_every=12",
        )
    )
    payload = torch.load(list_checkpoints(run_dir)[-1], weights_only=True)
    momentum = payload["optimizer"]["state"]
    assert momentum, "Neumann keeps per-parameter state"
    for name, tensor in final.items():
        assert torch.equal(payload["evaluation_model"][name], tensor)
    # The iterate differs from the evaluation weights w - mu m once m is non-zero.
    assert any(not torch.equal(payload["model"][k], final[k]) for k in final)


@pytest.mark.slow
@pytest.mark.parametrize("reader_gone", [False, True])
def test_sigterm_ends_the_whole_multirun(
    tmp_path: Path, data_root: Path, reader_gone: bool
) -> None:
    """A stop signal during a multirun's first trial checkpoints that trial and ends the sweep
    (exit 128 + SIGTERM): the later trials do not start — also when whoever read the output
    (a benchmark harness that was stopped) has gone and printing the summary fails."""
    overrides = small_run_overrides(
        "unused",
        data_root,
        "trainer.max_steps=100000",
        "trainer.eval_every=0",
        "trainer.log_every=1",
    )
    overrides = [o for o in overrides if not o.startswith("trainer.run_dir=")]
    command = [
        sys.executable,
        "-m",
        "secondorder.train",
        "--multirun",
        *overrides,
        "optimizer.lr=0.01,0.02",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=${hydra.job.num}",
        "trainer.run_dir=${hydra:sweep.dir}/${hydra:sweep.subdir}",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "0" / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
            time.sleep(0.2)
        if reader_gone:
            proc.stdout.close()
        proc.send_signal(signal.SIGTERM)
        out = "" if reader_gone else proc.communicate(timeout=60)[0].decode()
        proc.wait(timeout=60)
    finally:
        proc.kill()  # a sweep that went on to its next trial must not outlive the test
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    summary = json.loads((tmp_path / "0" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stop_signal"] == signal.SIGTERM
    assert list((tmp_path / "0" / "checkpoints").iterdir()), "the stopped trial is resumable"
    assert not (tmp_path / "1").exists()


def test_a_diverged_trial_does_not_end_a_multirun(tmp_path: Path, data_root: Path) -> None:
    """Hydra runs multirun trials in one process: the diverged first trial must not exit it,
    and the second trial still runs (the benchmark grids rely on this)."""
    overrides = small_run_overrides("unused", data_root, "trainer.max_steps=4")
    overrides = [o for o in overrides if not o.startswith("trainer.run_dir=")]
    command = [
        sys.executable,
        "-m",
        "secondorder.train",
        "--multirun",
        *overrides,
        "optimizer.lr=1.0e+12,0.01",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=${hydra.job.num}",
        "trainer.run_dir=${hydra:sweep.dir}/${hydra:sweep.subdir}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    statuses = [
        json.loads((tmp_path / str(n) / "summary.json").read_text())["status"] for n in (0, 1)
    ]
    assert statuses == ["diverged", "completed"]
