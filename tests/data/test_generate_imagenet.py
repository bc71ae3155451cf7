"""The generated ImageNet folder: deterministic, ImageNet-like sizes and JPEG quality, readable."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from secondorder.data import build_data
from secondorder.data.generate_imagenet import class_name, draw_size, generate, main


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    kwargs = dict(classes=2, train_per_class=3, val_per_class=1)
    first = _files(generate(tmp_path / "a", seed=3, **kwargs))
    assert len(first) == 2 * (3 + 1)
    assert _files(generate(tmp_path / "b", seed=3, **kwargs)) == first
    other = _files(generate(tmp_path / "c", seed=4, **kwargs))
    assert other.keys() == first.keys() and all(other[k] != first[k] for k in first)


def test_sizes_are_imagenet_like() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([draw_size(rng) for _ in range(4000)], dtype=np.float64)
    width, height = sizes.mean(axis=0)
    assert 380 <= width <= 420 and 330 <= height <= 370  # ImageNet: about 400 x 350
    aspect = sizes[:, 0] / sizes[:, 1]
    assert 0.1 < (aspect < 1).mean() < 0.4  # portraits exist, landscapes dominate
    assert np.quantile(aspect, 0.05) < 0.9 and np.quantile(aspect, 0.95) > 1.4


def test_jpeg_quality_and_photo_like_size(tmp_path: Path) -> None:
    root = generate(tmp_path, classes=1, train_per_class=4, val_per_class=0)
    for path in (root / "train" / class_name(0)).iterdir():
        picture = Image.open(path)
        assert picture.format == "JPEG" and picture.mode == "RGB"
        reference = io.BytesIO()
        picture.convert("RGB").save(reference, format="JPEG", quality=90)
        assert picture.quantization == Image.open(reference).quantization  # quality 90
        # Texture, not flat colour: a photograph's order of bytes per pixel at quality 90.
        per_pixel = os.path.getsize(path) / (picture.width * picture.height)
        assert 0.2 < per_pixel < 2.0, per_pixel


def test_the_imagenet_reader_loads_it(tmp_path: Path) -> None:
    generate(tmp_path, classes=3, train_per_class=4, val_per_class=2, seed=1)
    data = build_data("imagenet", root=str(tmp_path), image_size=32, eval_resize=36)
    assert len(data.train) == 12 and len(data.eval) == 6
    inputs, label = data.train[5]
    assert tuple(inputs.shape) == (3, 32, 32) and int(label) == 1


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tmp_path), "--classes", "2", "--train-per-class", "1", "--val-per-class", "1"]
    assert main(args) == 0
    assert len(_files(tmp_path)) == 4
    assert main([str(tmp_path / "x"), "--classes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
