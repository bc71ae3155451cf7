"""Hostile or mistaken data and model/data combinations: refused with one message before any
work, never code run from a data file, and skipped images on the record."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, train
from PIL import Image
from torch.utils.data import DataLoader

from secondorder.config import ConfigError, validate
from secondorder.data import DataError, cifar10, imagenet
from secondorder.train import USER_ERRORS, run

CIFAR_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


class _Payload:
    """Unpickling this runs ``os.system``: what a crafted data file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _cifar_root(tmp_path: Path, *, per_file: int = 3) -> Path:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in CIFAR_FILES:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        with (root / name).open("wb") as handle:
            pickle.dump({b"data": data, b"labels": [i % 10 for i in range(per_file)]}, handle)
    return root


def _compose(overrides: list[str], data_root: Path):
    root = [] if "data=synthetic" in overrides else [f"data.root={data_root}"]  # no files there
    return compose_config([*overrides, *root])


def _cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "secondorder.train", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


# -- 8: a CIFAR batch file must not run code ------------------------------------------------------


def test_crafted_cifar_batch_is_refused_without_running_its_payload(tmp_path: Path) -> None:
    root = _cifar_root(tmp_path)
    marker = tmp_path / "payload-ran"
    with (root / "data_batch_1").open("wb") as handle:
        pickle.dump({b"data": _Payload(f"touch {marker}"), b"labels": [0]}, handle)
    with pytest.raises(DataError) as err:
        cifar10(root=str(root))
    assert not marker.exists(), "the file's payload ran"
    assert "data_batch_1" in str(err.value) and "system" in str(err.value)


def test_crafted_cifar_batch_stops_a_run_with_a_user_error(tmp_path: Path) -> None:
    root = _cifar_root(tmp_path)
    marker = tmp_path / "payload-ran"
    with (root / "test_batch").open("wb") as handle:
        pickle.dump([_Payload(f"touch {marker}")], handle)
    overrides = ["model=resnet20", "data=cifar10", f"data.root={root}", "data.batch_size=5"]
    with pytest.raises(USER_ERRORS, match="test_batch"):
        run(compose_config([*overrides, f"trainer.run_dir={tmp_path / 'run'}", "logger=none"]))
    assert not marker.exists()


# -- 9: model/data mismatches are config errors, before any data ----------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=autoencoder", "data=cifar10"], "model.in_features: autoencoder takes"),
        (["model=resnet50"], "model.in_channels: resnet50 takes inputs of shape (3, H, W)"),
        (["model.num_classes=5"], "model.num_classes: cnn1d predicts 5 classes, but data mnist1d"),
        (["model.in_length=50"], "model.in_length: cnn1d takes inputs of shape (50,) or (1, 50)"),
        (["model=resnet20", "model.in_channels=1", "data=cifar10"], "(1, H, W)"),
        (["model=convnet", "data=synthetic", "data.shape=[3,64,64]"], "model.in_channels /"),
        (["model=mlp", "model.task=reconstruction"], "model.task: mlp is a classification model"),
        (["model=autoencoder", "model.task=classification"], "model.task: autoencoder is a"),
    ],
)
def test_model_data_mismatch_is_a_config_error(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        validate(_compose(overrides, tmp_path))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=autoencoder", "model.in_features=3072", "data=cifar10"],
        ["model=resnet50", "data=synthetic", "data.shape=[3,32,32]"],  # more logits than classes
        ["model=mlp", "model.in_features=3072", "data=synthetic"],  # flattens any shape
        ["model=cnn1d", "data=synthetic", "data.shape=[1,40]"],
    ],
)
def test_models_that_fit_their_data_pass(overrides: list[str], tmp_path: Path) -> None:
    validate(_compose(overrides, tmp_path))


def test_model_data_mismatch_exits_2_before_any_work(tmp_path: Path) -> None:
    result = _cli(
        "model=resnet50",
        "data=mnist1d",
        "data.num_samples=1200",
        f"data.root={tmp_path / 'data'}",
        f"trainer.run_dir={tmp_path / 'run'}",
        "logger=none",
        cwd=tmp_path,
    )
    _one_error_line(result, "model.in_channels", "mnist1d", "(40,)")
    assert not (tmp_path / "run").exists(), "no run dir, summary or final_model.pt"
    assert not (tmp_path / "data").exists(), "no data generated"


# -- 13 (data): sizes the config decides are checked there; the files' sizes right after loading --


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.num_samples=1200", "data.batch_size=1024"], "data.batch_size: 1024 is larger"),
        (["data.train_split=1.0"], "data.train_split: train_split must be in (0, 1)"),
        (["data=synthetic", "model=convnet", "data.shape=[0,32,32]"], "data.shape: shape must"),
    ],
)
def test_data_size_mistakes_are_config_errors(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        validate(_compose(overrides, tmp_path))
    assert message in str(err.value)


def test_batch_larger_than_training_set_exits_2(tmp_path: Path) -> None:
    result = _cli(
        "data.num_samples=1200",
        "data.batch_size=1024",
        f"data.root={tmp_path / 'data'}",
        f"trainer.run_dir={tmp_path / 'run'}",
        "logger=none",
        cwd=tmp_path,
    )
    _one_error_line(result, "data.batch_size", "960 samples")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_batch_larger_than_the_files_is_a_data_error(tmp_path: Path) -> None:
    root = _cifar_root(tmp_path)  # 15 training images: only the files tell
    overrides = ["model=resnet20", "data=cifar10", f"data.root={root}", "data.batch_size=32"]
    cfg = compose_config([*overrides, f"trainer.run_dir={tmp_path / 'run'}", "logger=none"])
    with pytest.raises(DataError, match="larger than the training set"):
        run(cfg)
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "final_model.pt").exists()


# -- 15: skipped unreadable images are counted on the record --------------------------------------


def _image_folder(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for label, colour in enumerate([(250, 10, 10), (10, 250, 10)]):
            for i in range(4):
                path = root / split / f"class{label}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12, 10), colour).save(path)
    bad = root / "train" / "class1" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root, bad


def test_skipped_images_are_counted_across_loader_workers(tmp_path: Path) -> None:
    root, _ = _image_folder(tmp_path)
    train = imagenet(root=str(root), image_size=8, eval_resize=8, max_bad_fraction=0.5).train
    loader = DataLoader(train, batch_size=2, num_workers=2)
    assert sum(len(y) for _, y in loader) == len(train)
    assert train.skipped == 1


def test_skipped_images_are_in_metrics_and_summary(tmp_path: Path) -> None:
    root, _ = _image_folder(tmp_path)
    summary, _ = train(
        [
            f"trainer.run_dir={tmp_path / 'run'}",
            "model=resnet20",
            "model.num_classes=2",
            "data=imagenet",
            f"data.root={root}",
            "data.image_size=8",
            "data.eval_resize=8",
            "data.max_bad_fraction=0.5",
            "data.batch_size=8",
            "data.eval_batch_size=8",
            "trainer.max_steps=2",
            "trainer.eval_every=2",
            "trainer.log_every=1",
            "trainer.progress=false",
            "trainer.threads=1",
            "logger=none",
        ]
    )
    assert summary["skipped_images"] == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [r["skipped_images"] for r in records if "skipped_images" in r]
    assert logged and logged[-1] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_images"] == 1
    assert torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)


# -- the declarations the checks rely on match what the factories build -------------------------


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("synthetic", {"num_samples": 20, "eval_samples": 6, "shape": [2, 5], "num_classes": 3}),
        ("mnist1d", {"num_samples": 300, "train_split": 0.7, "progress": False}),
    ],
)
def test_data_spec_matches_the_bundle(name: str, kwargs: dict, tmp_path: Path) -> None:
    from secondorder.data import build_data, data_spec

    if name == "mnist1d":
        kwargs = {**kwargs, "root": str(tmp_path)}
    spec, bundle = data_spec(name, **kwargs), build_data(name, **kwargs)
    assert spec.input_shape == bundle.input_shape == tuple(bundle.train[0][0].shape)
    assert spec.num_classes == bundle.num_classes
    assert (spec.train_samples, spec.eval_samples) == (len(bundle.train), len(bundle.eval))


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "convnet", "autoencoder", "resnet20"])
def test_model_spec_matches_the_model(name: str) -> None:
    from secondorder.models import build_model, model_spec

    spec, model = model_spec(name), build_model(name).eval()
    shape = spec.input_shapes[0] if spec.input_shapes else (spec.input_features,)
    shape = tuple(d if d is not None else 16 for d in shape)
    assert spec.takes(shape)
    out = model(torch.zeros(2, *shape))
    expected = (2, spec.num_classes) if spec.num_classes is not None else (2, *shape)
    assert tuple(out.shape) == expected
