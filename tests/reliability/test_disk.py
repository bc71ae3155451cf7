"""Checkpoints and records on disk: a full disk, a torn metrics line, damaged checkpoints, and a
resume on other data. The full disk is an injected ``ENOSPC`` from the write itself."""

from __future__ import annotations

import errno
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, small_run_overrides, train

from secondorder.distributed.testing import run_on_ranks
from secondorder.trainer import checkpoint as ckpt
from secondorder.trainer.checkpoint import CheckpointError, list_checkpoints


def full_disk(obj: object, f: object, *args: object, **kwargs: object) -> None:
    """``torch.save`` on a full disk: part of the file lands, then ENOSPC."""
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as handle:
            handle.write(b"x" * 4096)
    else:
        f.write(b"x" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.rglob("*") if "tmp" in p.name]


def test_full_disk_during_checkpoint_is_reported_and_cleaned_up(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 5: the checkpoint's own error (not the final-model save's) says which file system
    and how many bytes, no temp file stays behind, and summary.json is still written."""
    run_dir = tmp_path / "full"
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as caught:
        train(small_run_overrides(run_dir, data_root, "trainer.checkpoint_every=6"))
    message = str(caught.value)
    assert "No space left on device" in message and "step_00000006.pt" in message
    assert "bytes" in message and "mounted at" in message
    assert _leftovers(run_dir) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 6
    assert "No space left on device" in summary["error"]
    assert not (run_dir / "final_model.pt").exists()


@pytest.mark.slow
def test_full_disk_is_one_error_line_and_exit_2(tmp_path: Path, data_root: Path) -> None:
    """Item 5 from the command line: one ``error:`` line, no chained tracebacks."""
    overrides = small_run_overrides(tmp_path / "run", data_root, "trainer.checkpoint_every=6")
    script = (
        "import errno, os, sys, torch\n"
        + inspect.getsource(full_disk)
        + textwrap.dedent(
            f"""
        torch.save = full_disk
        from secondorder.train import main
        sys.argv = ["secondorder-train", *{overrides!r}, "hydra.run.dir={tmp_path / "hydra"}"]
        main()
        """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_resume_drops_a_torn_metrics_line(tmp_path: Path, data_root: Path) -> None:
    """Item 6: a kill mid-write leaves half a record; resume=auto warns and goes on."""
    run_dir = tmp_path / "torn"
    extra = ("trainer.checkpoint_every=4",)
    train(small_run_overrides(run_dir, data_root, *extra, "trainer.max_steps=8"))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "epoch": 0.5, "train_lo')
    with pytest.warns(UserWarning, match="dropped unreadable line"):
        summary, _ = train(small_run_overrides(run_dir, data_root, *extra, "trainer.resume=auto"))
    assert summary["steps"] == 12
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().split("\n")
        if line
    ]
    assert steps == sorted(steps) and steps[-1] == 12


def test_resume_refuses_other_data(tmp_path: Path, data_root: Path) -> None:
    """Item 12: the same data set name with more samples would resume with another order."""
    run = small_run_overrides(tmp_path / "r", data_root, "trainer.checkpoint_every=4")
    train([*run, "trainer.max_steps=4"])
    with pytest.raises(CheckpointError, match="data.num_samples: checkpoint has 1200, this run"):
        train([*run, "data.num_samples=1500", "trainer.resume=auto"])
    with pytest.raises(CheckpointError, match="trainer.seed: checkpoint has 0, this run has 1"):
        train([*run, "trainer.seed=1", "trainer.resume=auto"])


def test_fingerprint_ignores_where_the_data_lives() -> None:
    """Moving the data or writing a default out is the same setup; more samples is not."""

    def mark(**data: object) -> dict:
        return ckpt.fingerprint(
            model="cnn1d",
            model_options={},
            data="mnist1d",
            data_options=data,
            train_samples=960,
            seed=0,
        )

    assert mark(root="a", progress=True) == mark(root="b", progress=False)
    assert mark() == mark(num_samples=10000)
    assert mark() != mark(num_samples=3000)


def test_zero_length_checkpoint_gives_a_reason(tmp_path: Path) -> None:
    """Item 13 (part): an empty file is refused as one, not with an empty reason."""
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty file"):
        ckpt.load_checkpoint(empty, expect={})


def test_damaged_newest_checkpoint_falls_back(tmp_path: Path, data_root: Path) -> None:
    """Item 14: resume=auto skips a truncated newest checkpoint and says which it used; an
    explicit path to it names the intact older one; all damaged is refused, not restarted."""
    run_dir = tmp_path / "fb"
    extra = ("trainer.checkpoint_every=4", "trainer.keep_checkpoints=3")
    _, straight = train(small_run_overrides(tmp_path / "straight", data_root, *extra))
    train(small_run_overrides(run_dir, data_root, *extra, "trainer.max_steps=8"))
    older, newest = list_checkpoints(run_dir)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"intact older checkpoint exists: {older}"):
        train(small_run_overrides(run_dir, data_root, *extra, f"trainer.resume={newest}"))
    with pytest.warns(UserWarning, match=f"{newest.name}.*resuming from {older}"):
        summary, resumed = train(
            small_run_overrides(run_dir, data_root, *extra, "trainer.resume=auto")
        )
    assert summary["steps"] == 12
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name

    for path in list_checkpoints(run_dir):
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint .* can be read"):
        train(small_run_overrides(run_dir, data_root, *extra, "trainer.resume=auto"))


def _resume_on_rank(overrides: list[str]) -> str | None:
    """Run on one rank; the refusal's message, or ``None`` if the run went ahead."""
    from conftest import compose_config

    from secondorder.train import run

    try:
        run(compose_config(overrides))
    except CheckpointError as err:
        return str(err)
    return None


@pytest.mark.slow
def test_refused_resume_stops_every_rank(tmp_path: Path, data_root: Path) -> None:
    """Items 12-14 on two ranks: rank 0 checks the checkpoint and every rank gets its refusal
    (before, the other ranks were left waiting in a collective for rank 0's answer)."""
    missing = tmp_path / "gone.pt"
    run = [
        *small_run_overrides(tmp_path / "two", data_root),
        "distributed=torch",
        f"trainer.resume={missing}",
    ]
    refused = run_on_ranks(_resume_on_rank, world_size=2, args=(run,), timeout_s=90)
    assert all(r is not None and "no such checkpoint file" in r for r in refused), refused


def test_a_killed_writer_leaves_no_temporary_file_behind(tmp_path: Path) -> None:
    """Item 5: a write cut by a kill leaves its temporary file; the next checkpoint removes it
    (a live writer's file stays)."""
    folder = ckpt.checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = folder / f".tmp-{dead.stdout.strip()}-step_00000004.pt"
    orphan.write_bytes(b"x" * 1000)
    live = folder / f".tmp-{os.getppid()}-step_00000004.pt"
    live.write_bytes(b"x")
    ckpt.save_checkpoint({"step": 8}, run_dir=tmp_path, step=8, keep=3)
    assert not orphan.exists() and live.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000008.pt"]
