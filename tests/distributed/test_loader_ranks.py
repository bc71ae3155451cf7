"""The step loader inside spawned ranks: persistent workers forked by each rank give, over the
ranks, exactly the single-process batches, and a 2-rank run records its global throughput."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from PIL import Image
from torch.utils.data import Dataset

from secondorder.data.loader import make_step_loader
from secondorder.data.sampler import GlobalBatchSampler, plan_batches
from secondorder.distributed.testing import run_on_ranks


class RandomImages(Dataset):
    """uint8 images whose pixels come from the sample's generator (augmentation stands-in)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        return self.sample(index, None)

    def sample(self, index: int, generator: torch.Generator | None):
        return torch.randint(0, 256, (3, 2, 2), generator=generator).to(torch.uint8), index


def _batches(world_size: int, rank: int, workers: int, steps: list[int]):
    plan = plan_batches(global_batch=8, world_size=world_size, max_micro_batch=2)
    sampler = GlobalBatchSampler(num_samples=40, plan=plan, rank=rank, seed=11)
    loader = make_step_loader(RandomImages(), sampler, num_workers=workers)
    try:
        return [loader.batches(step) for step in steps]
    finally:
        loader.close()


def _rank_batches(steps: list[int]):
    # The harness spawns its ranks as daemons, which may not start processes; a rank started
    # by torchrun or horovodrun is not one.
    multiprocessing.current_process().daemon = False
    return _batches(int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), 2, steps)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ranks_with_workers_see_the_single_process_batches() -> None:
    steps = [0, 1, 4, 7]  # two epochs of 5 steps, a jump included
    single = _batches(1, 0, 0, steps)
    per_rank = run_on_ranks(_rank_batches, world_size=2, args=(steps,), timeout_s=150)
    for i in range(len(steps)):
        joined = [mb for rank in per_rank for mb in rank[i]]
        assert torch.equal(torch.cat([x for x, _ in joined]), torch.cat([x for x, _ in single[i]]))
        assert torch.equal(torch.cat([y for _, y in joined]), torch.cat([y for _, y in single[i]]))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_record_global_and_rank_throughput(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for label in range(2):
            for i in range(8):
                path = root / split / f"class{label}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12, 10), (30 * i, 200 * label, 90)).save(path)
    overrides = [
        f"trainer.run_dir={tmp_path / 'run'}",
        "model=resnet20",
        "model.num_classes=2",
        "data=imagenet",
        f"data.root={root}",
        "data.num_workers=2",
        "data.image_size=8",
        "data.eval_resize=8",
        "data.batch_size=8",
        "data.eval_batch_size=4",
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.log_every=2",
        "trainer.progress=false",
        "trainer.threads=1",
        "logger=none",
        "distributed=torch",
    ]
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", NPROC="2")
    env["TORCHRUN"] = str(Path(sys.executable).with_name("torchrun"))
    command = ["bash", str(REPO / "launch" / "torchrun.sh"), *overrides]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for record in logged:
        assert record["images_per_s"] == pytest.approx(2 * record["rank_images_per_s"])
        assert record["data_wait_s"] >= 0
    assert 0 <= summary["mean_data_wait_fraction"] <= 1
    for rank in range(2):  # every rank's heartbeat still says how long it waited for data
        beat = json.loads((tmp_path / "run" / f"heartbeat.rank{rank}.json").read_text())
        assert 0 <= beat["data_wait_s"] < beat["step_time_s"]
