"""The trainer with its step loader: uint8 batches converted on the device train exactly like
float batches normalised on the CPU, a dying or failing worker ends the run with one error line
and no process left, and the input pipeline's records reach metrics.jsonl and the summary."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_config, train
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, get_worker_info

from secondorder.build import loader_workers
from secondorder.config import ConfigError, validate
from secondorder.data import DataError, Task
from secondorder.data.sampler import GlobalBatchSampler, plan_batches
from secondorder.distributed.comm import NoComm
from secondorder.trainer import DataFeed, RunOutput, RunParts, Trainer, TrainerSettings

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class Images(Dataset):
    """uint8 images fixed by the index (as a decoded file is), with ``normalization``; or the
    same images as floats normalised on the CPU with today's formula (``as_float``). A worker
    preparing index ``fail_at`` dies (``kill``) or raises ``error``."""

    normalization = (MEAN, STD)

    def __init__(self, *, as_float=False, fail_at=None, kill=False, error=RuntimeError):
        self.as_float, self.fail_at, self.kill, self.error = as_float, fail_at, kill, error

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        if index == self.fail_at and get_worker_info() is not None:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise self.error(f"cannot prepare item {index}")
        generator = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, 4, 4), generator=generator).to(torch.uint8)
        if self.as_float:
            mean = torch.tensor(MEAN).view(-1, 1, 1)
            std = torch.tensor(STD).view(-1, 1, 1)
            return image.float().div_(255.0).sub_(mean).div_(std), index % 3
        return image, index % 3


def _trainer(tmp_path: Path, train_set: Dataset, *, workers: int, steps: int = 6, model=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    plan = plan_batches(global_batch=16, world_size=1, max_micro_batch=8)
    sampler = GlobalBatchSampler(num_samples=len(train_set), plan=plan, rank=0, seed=1)
    return Trainer(
        TrainerSettings(max_steps=steps, eval_every=3, log_every=2, progress=False),
        RunParts(model, torch.optim.SGD(model.parameters(), lr=0.1), NoComm(), torch.device("cpu")),
        DataFeed(train_set, Images(as_float=True), Task(), sampler, 8, num_workers=workers),
        RunOutput(tmp_path, {"model": "linear", "optimizer": "sgd", "data": "images"}),
    )


def _children() -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(entry))
    return found


def _no_children_left(before: set[int]) -> None:
    deadline = time.monotonic() + 30
    while _children() - before:
        assert time.monotonic() < deadline, f"loader processes left: {_children() - before}"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_batches_train_exactly_like_cpu_normalised_floats(tmp_path: Path, workers) -> None:
    reference = _trainer(tmp_path / "float", Images(as_float=True), workers=0)
    reference.fit()
    ours = _trainer(tmp_path / "uint8", Images(), workers=workers)
    summary = ours.fit()
    for a, b in zip(reference.model.parameters(), ours.model.parameters(), strict=True):
        assert torch.equal(a, b)  # bitwise: the device conversion is the same float formula
    assert summary["final_eval_loss"] == reference.last_eval["eval_loss"]


@pytest.mark.parametrize("sigchld_handler", [False, True])
def test_a_killed_worker_fails_the_run_with_one_error_line(
    tmp_path: Path, capsys, monkeypatch, request, sigchld_handler: bool
) -> None:
    """Also with torch's SIGCHLD handler installed (once per process, by any DataLoader iterated
    in the main thread): it raises the worker's death wherever the main thread is."""
    if sigchld_handler:
        from torch.utils.data._utils import signal_handling

        previous = signal.getsignal(signal.SIGCHLD)
        monkeypatch.setattr(signal_handling, "_SIGCHLD_handler_set", False)
        signal_handling._set_SIGCHLD_handler()
        request.addfinalizer(lambda: signal.signal(signal.SIGCHLD, previous))
    before = _children()
    data = Images(kill=True)
    trainer = _trainer(tmp_path, data, workers=2)
    # Prepared ahead, while step 0 or 1 computes: the death surfaces by step 2's batches at the
    # latest, as the worker's exit or as its earlier batch lost with it.
    data.fail_at = int(trainer.sampler.indices(2)[0][0])
    summary = trainer.fit()
    assert summary["status"] == "failed" and summary["steps"] <= 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: data loader worker died: ")
    _no_children_left(before)


def test_a_worker_that_raises_fails_the_run_with_its_error(tmp_path: Path, capsys) -> None:
    before = _children()
    trainer = _trainer(tmp_path, Images(), workers=2)
    trainer.loader.pipeline.loader.dataset.dataset.fail_at = int(trainer.sampler.indices(3)[1][2])
    summary = trainer.fit()
    assert summary["status"] == "failed" and summary["steps"] == 3
    err = capsys.readouterr().err
    assert "error: data loader worker failed: RuntimeError: cannot prepare item" in err
    assert "Traceback" not in err
    _no_children_left(before)


def test_a_data_error_in_a_worker_stays_a_data_error(tmp_path: Path) -> None:
    before = _children()
    trainer = _trainer(tmp_path, Images(error=DataError), workers=2)
    trainer.loader.pipeline.loader.dataset.dataset.fail_at = int(trainer.sampler.indices(1)[0][0])
    with pytest.raises(DataError, match="cannot prepare item"):  # exit 2 through train.py
        trainer.fit()
    _no_children_left(before)


def test_an_exception_mid_run_leaves_no_loader_process(tmp_path: Path) -> None:
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.calls = nn.Linear(48, 3), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 5:
                raise ValueError("a bug in the model")
            return self.linear(x.flatten(1))

    before = _children()
    trainer = _trainer(tmp_path, Images(), workers=2, model=Breaks())
    with pytest.raises(ValueError, match="a bug in the model"):
        trainer.fit()
    _no_children_left(before)


def _image_folder(root: Path) -> Path:
    for split in ("train", "val"):
        for label in range(2):
            for i in range(8):
                path = root / split / f"class{label}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12, 10), (40 * i, 200 * label, 90)).save(path)
    (root / "train" / "class1" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def test_input_pipeline_records_in_metrics_and_summary(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imagenet")
    before = _children()
    summary, _ = train(
        [
            f"trainer.run_dir={tmp_path / 'run'}",
            "model=resnet20",
            "model.num_classes=2",
            "data=imagenet",
            f"data.root={root}",
            "data.num_workers=2",
            "data.image_size=8",
            "data.eval_resize=8",
            "data.max_bad_fraction=0.5",
            "data.batch_size=4",
            "data.eval_batch_size=4",
            "trainer.max_steps=4",
            "trainer.eval_every=2",
            "trainer.log_every=2",
            "trainer.progress=false",
            "trainer.threads=1",
            "logger=none",
        ]
    )
    _no_children_left(before)
    assert summary["status"] == "completed"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for record in logged:
        assert record["data_wait_s"] >= 0
        assert record["images_per_s"] == pytest.approx(record["rank_images_per_s"])  # 1 rank
        assert record["images_per_s"] > 0
    assert 0 <= summary["mean_data_wait_fraction"] <= 1
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["mean_data_wait_fraction"] == summary["mean_data_wait_fraction"]
    assert saved["skipped_images"] == 1  # counted across the workers' shared bitmap


def _data_config(*overrides: str):
    return validate(compose_config(["logger=none", *overrides]))


def test_loader_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="data.num_workers: must be 0 or more"):
        _data_config("data.num_workers=-1")
    with pytest.raises(ConfigError, match="data.loader: expected"):
        _data_config("data.loader=threads")
    with pytest.raises(ConfigError, match="data.loader: dali reads ImageNet folders only"):
        _data_config("data=synthetic", "data.loader=dali")


def test_dali_without_dali_or_cuda_is_a_config_error() -> None:
    try:
        from secondorder.data.dali_loader import dali_unavailable_reason
    except ImportError:
        pass
    else:
        if dali_unavailable_reason() is None:
            pytest.skip("DALI and CUDA are available here")
    with pytest.raises(ConfigError, match=r"^data.loader=dali: "):
        _data_config("data=imagenet", "model=resnet20", "data.loader=dali")


def test_auto_workers_share_the_cores_among_local_ranks(monkeypatch) -> None:
    run = _data_config("data=imagenet", "model=resnet20")
    assert run.data.num_workers == "auto"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert loader_workers(run, {}) == 16  # 63, capped
    assert loader_workers(run, {"LOCAL_WORLD_SIZE": "8"}) == 7
    assert loader_workers(run, {"HOROVOD_LOCAL_SIZE": "64"}) == 0
    assert (
        loader_workers(_data_config("data=imagenet", "model=resnet20", "data.num_workers=3"), {})
        == 3
    )


def test_progress_bar_shows_loss_wait_and_throughput() -> None:
    from secondorder.trainer.records import Throughput, progress_postfix

    meter = Throughput(rank_batch=8, global_batch=32)
    meter.add(wait_s=0.5, step_s=2.0)
    meter.add(wait_s=0.0, step_s=2.0)
    record = {"train_loss": 0.25, **meter.record()}
    assert record == {
        "train_loss": 0.25,
        "data_wait_s": 0.25,
        "images_per_s": 16.0,
        "rank_images_per_s": 4.0,
    }
    assert progress_postfix(record) == {"loss": "0.2500", "wait_s": "0.250", "img/s": "16"}
    assert meter.mean_data_wait_fraction == 0.125
    assert meter.record() == {}  # nothing since the last record
    assert progress_postfix({"train_loss": None}) == {}


def test_a_stop_signal_mid_run_leaves_no_loader_process(tmp_path: Path, monkeypatch) -> None:
    original = Trainer._train_step

    def train_step(self: Trainer):
        loss = original(self)
        if self.step == 2:  # the next steps are being prepared by the workers now
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(Trainer, "_train_step", train_step)
    before = _children()
    summary = _trainer(tmp_path, Images(), workers=2).fit()
    assert summary["status"] == "failed" and summary["stop_signal"] == signal.SIGTERM
    assert summary["steps"] == 2
    _no_children_left(before)
