"""The DALI step loader: why it cannot run, and its pipeline's order, shapes, labels, normalisation
and flips (CPU operators where DALI is installed without a GPU; the GPU case where CUDA is)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from secondorder.data import imagenet
from secondorder.data.dali_loader import DaliStepLoader, dali_unavailable_reason
from secondorder.data.imagenet_data import IMAGENET_MEAN, IMAGENET_STD
from secondorder.data.sampler import GlobalBatchSampler, plan_batches


def _dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


needs_dali = pytest.mark.skipif(not _dali_importable(), reason="NVIDIA DALI is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]
SIZE = 16


def test_reason_when_dali_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    reason = dali_unavailable_reason()
    assert reason == "NVIDIA DALI is not installed (pip install '.[dali]')"
    with pytest.raises(RuntimeError, match=r"^data.loader=dali: NVIDIA DALI is not installed"):
        DaliStepLoader(dataset=None, sampler=None, device=torch.device("cpu"), seed=0)


@needs_dali
def test_reason_depends_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = dali_unavailable_reason()
    assert reason is not None and "CUDA" in reason and "\n" not in reason
    with pytest.raises(RuntimeError, match="data.loader=dali: needs a CUDA device"):
        DaliStepLoader(dataset=None, sampler=None, device=torch.device("cuda"), seed=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dali_unavailable_reason() is None


@pytest.fixture
def colour_folder(tmp_path: Path) -> Path:
    """Three classes of solid-colour JPEGs of varied sizes: any crop has the class's colour."""
    root = tmp_path / "imagenet"
    for split, count in (("train", 5), ("val", 1)):
        for label, colour in enumerate(COLOURS):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                size = (40 + 7 * i, 30 + 5 * label)
                Image.new("RGB", size, colour).save(folder / f"{i}.JPEG", quality=95)
    return root


def _expected(label: int) -> torch.Tensor:
    rgb = torch.tensor(COLOURS[label], dtype=torch.float32) / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return ((rgb - mean) / std).view(3, 1, 1).expand(3, SIZE, SIZE)


def _check_order_and_pixels(root: Path, device: torch.device) -> None:
    train = imagenet(root=str(root), image_size=SIZE, eval_resize=SIZE).train
    plan = plan_batches(global_batch=8, world_size=2, max_micro_batch=2)
    assert (plan.micro_batch, plan.accumulation_steps) == (2, 2)
    for rank in range(2):
        sampler = GlobalBatchSampler(num_samples=len(train), plan=plan, rank=rank, seed=4)
        loader = DaliStepLoader(
            dataset=train, sampler=sampler, device=device, seed=4, num_threads=1
        )
        try:
            for step in (0, 1, 2, 7, 3):  # in order, across an epoch, a jump and back
                batches = loader.batches(step)
                expected = [[train.label(int(i)) for i in idx] for idx in sampler.indices(step)]
                assert [y.tolist() for _, y in batches] == expected
                for x, y in batches:
                    assert x.dtype == torch.float32 and x.device.type == device.type
                    assert x.shape == (len(y), 3, SIZE, SIZE) and y.dtype == torch.int64
                    for image, label in zip(x.cpu(), y.tolist(), strict=True):
                        torch.testing.assert_close(image, _expected(label), atol=0.1, rtol=0)
        finally:
            loader.close()
            loader.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            loader.batches(0)


@needs_dali
def test_cpu_pipeline_keeps_the_sampler_order_and_normalises(colour_folder: Path) -> None:
    _check_order_and_pixels(colour_folder, torch.device("cpu"))


@needs_dali
@needs_cuda
def test_gpu_pipeline_keeps_the_sampler_order_and_normalises(colour_folder: Path) -> None:
    _check_order_and_pixels(colour_folder, torch.device("cuda"))


@needs_dali
def test_random_crops_and_flips(tmp_path: Path) -> None:
    """A horizontal ramp: outputs differ (random crops) and run both ways (random flips)."""
    root = tmp_path / "ramp"
    ramp = np.tile(np.linspace(0, 255, 120).astype(np.uint8)[None, :, None], (90, 1, 3))
    for split in ("train", "val"):
        (root / split / "c").mkdir(parents=True)
        for i in range(32):
            Image.fromarray(ramp).save(root / split / "c" / f"{i}.png")
    train = imagenet(root=str(root), image_size=SIZE, eval_resize=SIZE).train
    plan = plan_batches(global_batch=32, world_size=1, max_micro_batch=32)
    sampler = GlobalBatchSampler(num_samples=32, plan=plan, rank=0, seed=0)
    loader = DaliStepLoader(dataset=train, sampler=sampler, device="cpu", seed=1, prefetch=False)
    try:
        rows = torch.cat([x for step in range(2) for x, _ in loader.batches(step)])[:, 0, 8, :]
    finally:
        loader.close()
    rising = (rows[:, -1] > rows[:, 0]).float().mean().item()
    assert 0.2 < rising < 0.8, rising  # 64 fair coins: far inside
    assert len({tuple(r.round(decimals=3).tolist()) for r in rows}) > 32


@needs_dali
def test_unreadable_files_are_skipped_as_the_dataset_skips(colour_folder: Path) -> None:
    bad = colour_folder / "train" / "class1" / "2.JPEG"
    bad.write_bytes(b"not an image")
    train = imagenet(root=str(colour_folder), image_size=SIZE, eval_resize=SIZE).train
    train.max_bad_fraction = 0.5
    plan = plan_batches(global_batch=15, world_size=1, max_micro_batch=15)
    sampler = GlobalBatchSampler(num_samples=len(train), plan=plan, rank=0, seed=0)
    loader = DaliStepLoader(dataset=train, sampler=sampler, device="cpu", seed=0, prefetch=False)
    try:
        ((x, y),) = loader.batches(0)
    finally:
        loader.close()
    assert x.shape[0] == 15 and train.bad_files == {str(bad)} and train.skipped == 1
    index = [train.path(i) for i in range(len(train))].index(bad)
    assert y.tolist().count(train.label(index + 1)) >= 1
