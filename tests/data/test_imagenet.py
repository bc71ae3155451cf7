"""Tests for the ImageNet folder reader."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from secondorder.data import DataError, imagenet
from secondorder.data.imagenet_data import IMAGENET_MEAN, IMAGENET_STD

# Classes in deliberately unsorted creation order; indices must follow sorted names.
COLOURS = {"zebra": (250, 10, 10), "ant": (10, 250, 10), "moth": (10, 10, 250)}
SIZE, RESIZE = 8, 10


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    for name, colour in COLOURS.items():
        _image(root / "train" / name / "a.png", colour, (24, 16))
        _image(root / "train" / name / "b.JPEG", colour, (13, 20))
        _image(root / "val" / name / "c.png", colour, (30, 12))
    (root / "train" / "ant" / "notes.txt").write_text("not an image, ignored")
    return root


def _expected_pixel(colour: tuple[int, int, int]) -> torch.Tensor:
    rgb = torch.tensor(colour, dtype=torch.float32) / 255.0
    return (rgb - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def _normalized(x: torch.Tensor, normalization: tuple) -> torch.Tensor:
    """What the consumer of the uint8 hand-over does with the dataset's ``normalization``."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in normalization)
    return (x.to(torch.float32) / 255.0 - mean) / std


def test_shapes_and_sorted_labels(folder: Path) -> None:
    bundle = imagenet(root=str(folder), image_size=SIZE, eval_resize=RESIZE)
    assert bundle.num_classes == 3 and bundle.input_shape == (3, SIZE, SIZE)
    assert len(bundle.train) == 6 and len(bundle.eval) == 3
    assert not hasattr(bundle.train, "get_batch")
    classes = sorted(COLOURS)
    for split in (bundle.train, bundle.eval):
        assert split.normalization == (IMAGENET_MEAN, IMAGENET_STD)
        for i in range(len(split)):
            x, y = split[i]
            assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.uint8 and x.is_contiguous()
            assert y.dtype == torch.int64 and y.dim() == 0
            name = split.path(i).parent.name
            assert int(y) == classes.index(name)
            # Solid colours survive any crop/resize/flip (up to JPEG error): the uint8 pixels,
            # and the normalised input the consumer makes of them with `normalization`.
            jpeg = split.path(i).suffix == ".JPEG"
            colour = torch.tensor(COLOURS[name], dtype=torch.uint8).view(3, 1, 1)
            torch.testing.assert_close(
                x.int(), colour.expand(3, SIZE, SIZE).int(), atol=6 if jpeg else 0, rtol=0
            )
            expected = _expected_pixel(COLOURS[name]).view(3, 1, 1).expand(3, SIZE, SIZE)
            normalized = _normalized(x, split.normalization)
            torch.testing.assert_close(normalized, expected, atol=0.1 if jpeg else 1e-5, rtol=0)


def test_eval_transform_resize_then_centre_crop(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    _image(root / "train" / "c" / "x.png", (0, 0, 0), (8, 8))
    # A 40x20 image with a vertical stripe pattern: column j has intensity 6 * j.
    columns = (6 * np.arange(40, dtype=np.uint8))[None, :].repeat(20, axis=0)
    image = Image.fromarray(columns)
    (root / "val" / "c").mkdir(parents=True)
    image.convert("RGB").save(root / "val" / "c" / "y.png")
    bundle = imagenet(root=str(root), image_size=SIZE, eval_resize=RESIZE)
    x, _ = bundle.eval[0]
    # Shorter side 20 -> 10, so 40x20 -> 20x10; the centre 8x8 crop starts at column 6, row 1.
    reference = image.convert("RGB").resize((20, 10), Image.Resampling.BILINEAR)
    reference = torch.from_numpy(np.array(reference.crop((6, 1, 14, 9)), dtype=np.uint8))
    assert torch.equal(x, reference.permute(2, 0, 1))  # a PNG takes the full-size path
    assert torch.equal(x, bundle.eval[0][0])  # deterministic


def test_train_transform_is_random_but_seeded(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    image = Image.fromarray(((7 * np.arange(32 * 24)) % 256).astype(np.uint8).reshape(24, 32))
    for split in ("train", "val"):
        (root / split / "c").mkdir(parents=True)
        image.convert("RGB").save(root / split / "c" / "x.png")
    train = imagenet(root=str(root), image_size=SIZE, eval_resize=RESIZE).train
    torch.manual_seed(0)
    first = [train[0][0] for _ in range(5)]
    torch.manual_seed(0)
    again = [train[0][0] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(first[0], other) for other in first[1:])


def test_corrupt_image_is_skipped_and_counted(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = folder / "train" / "ant" / "a.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n definitely not a png")
    bundle = imagenet(root=str(folder), image_size=SIZE, eval_resize=RESIZE, max_bad_fraction=0.5)
    train = bundle.train
    index = [train.path(i) for i in range(len(train))].index(bad)
    with caplog.at_level(logging.WARNING):
        x, y = train[index]
        x2, y2 = train[index]
    # The next sample (ant/b.JPEG) is returned instead, deterministically.
    assert train.path(index + 1).name == "b.JPEG"
    assert int(y) == int(y2) == train.label(index + 1)
    assert torch.equal(x, x2)
    assert train.bad_files == {str(bad)}
    assert sum(str(bad) in record.getMessage() for record in caplog.records) == 1


def test_too_many_corrupt_images_raise(folder: Path) -> None:
    bad = folder / "val" / "moth" / "c.png"
    bad.write_bytes(b"garbage")
    bundle = imagenet(root=str(folder), image_size=SIZE, eval_resize=RESIZE)
    index = [bundle.eval.path(i) for i in range(len(bundle.eval))].index(bad)
    with pytest.raises(DataError, match=r"moth/c\.png") as info:
        bundle.eval[index]
    assert "1 unreadable" in str(info.value)


def test_truncated_jpeg_counts_as_bad(folder: Path) -> None:
    path = folder / "train" / "zebra" / "b.JPEG"
    path.write_bytes(path.read_bytes()[:60])
    bundle = imagenet(root=str(folder), image_size=SIZE, eval_resize=RESIZE, max_bad_fraction=0.2)
    for i in range(len(bundle.train)):
        bundle.train[i]
    assert bundle.train.bad_files == {str(path)}


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing_here"):
        imagenet(root=str(tmp_path / "nothing_here"))


def test_missing_split(folder: Path) -> None:
    for path in sorted((folder / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (folder / "val").rmdir()
    with pytest.raises(DataError, match="val"):
        imagenet(root=str(folder))


def test_val_class_not_in_train(folder: Path) -> None:
    _image(folder / "val" / "unicorn" / "u.png", (1, 2, 3), (12, 12))
    with pytest.raises(DataError, match="unicorn"):
        imagenet(root=str(folder))


@pytest.mark.parametrize("split", ["train", "val"])
def test_file_directly_in_split(folder: Path, split: str) -> None:
    _image(folder / split / "stray.png", (1, 2, 3), (12, 12))
    with pytest.raises(DataError, match="stray.png"):
        imagenet(root=str(folder))


def test_empty_split(folder: Path) -> None:
    for path in (folder / "val").rglob("*.png"):
        path.unlink()
    with pytest.raises(DataError, match="val.*no images"):
        imagenet(root=str(folder))


def test_split_without_class_folders(folder: Path) -> None:
    for path in sorted((folder / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    with pytest.raises(DataError, match="no class folders"):
        imagenet(root=str(folder))


@pytest.mark.parametrize(
    "kwargs",
    [{"image_size": 0}, {"image_size": 64, "eval_resize": 32}, {"max_bad_fraction": -0.1}],
)
def test_invalid_arguments(folder: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        imagenet(root=str(folder), **kwargs)
