"""The reduced-scale JPEG transforms: the crop law, faithfulness to a full decode, flips, eval."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from secondorder.data import imagenet
from secondorder.data.generate_imagenet import generate
from secondorder.data.image_transforms import (
    CROP_RATIO,
    CROP_SCALE,
    draft_reduction,
    eval_transform,
    random_resized_crop_box,
    to_uint8_chw,
    train_transform,
)

# Mean absolute difference (0-255 units) between a reduced-scale decode and a full decode of the
# same box, per image. Measured on the generated JPEGs: 0.6-1.0 on average, at most 2.4 (a
# wrongly mapped box or a missed flip gives tens).
MAX_IMAGE_ERROR = 4.0
MAX_MEAN_ERROR = 1.5


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = generate(tmp_path_factory.mktemp("gen"), classes=2, train_per_class=3, val_per_class=1)
    return sorted(root.rglob("*.JPEG"))


def _ks_distance(sample: np.ndarray, reference: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    points = np.concatenate([sample, reference])
    cdf_a = np.searchsorted(np.sort(sample), points, side="right") / len(sample)
    cdf_b = np.searchsorted(np.sort(reference), points, side="right") / len(reference)
    return float(np.abs(cdf_a - cdf_b).max())


def _reference_boxes(width: int, height: int, count: int, *, log_ratio: bool = True) -> np.ndarray:
    """The RandomResizedCrop law by rejection, independently of torch: (w, h) of accepted draws
    (the first accepted of ten tries is distributed as one draw conditioned on acceptance).
    ``log_ratio=False`` draws the aspect ratio uniformly instead: a wrong law to tell apart."""
    rng = np.random.default_rng(0)
    area = width * height
    scale = rng.uniform(*CROP_SCALE, size=4 * count)
    if log_ratio:
        ratio = np.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), 4 * count))
    else:
        ratio = rng.uniform(*CROP_RATIO, size=4 * count)
    w = np.round(np.sqrt(scale * area * ratio))
    h = np.round(np.sqrt(scale * area / ratio))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    return np.stack([w[ok], h[ok]], axis=1)[:count]


def test_crop_box_follows_the_random_resized_crop_law() -> None:
    width, height, n = 480, 360, 4000
    generator = torch.Generator().manual_seed(1)
    boxes = np.array([random_resized_crop_box(width, height, generator) for _ in range(n)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + w <= width).all() and (top + h <= height).all()
    reference = _reference_boxes(width, height, 200_000)
    critical = 1.95 * math.sqrt(1 / n + 1 / len(reference))  # alpha = 0.001
    area = lambda wh: wh[:, 0] * wh[:, 1] / (width * height)  # noqa: E731
    log_ratio = lambda wh: np.log(wh[:, 0] / wh[:, 1])  # noqa: E731
    observed = np.stack([w, h], axis=1).astype(np.float64)
    assert _ks_distance(area(observed), area(reference)) < critical
    assert _ks_distance(log_ratio(observed), log_ratio(reference)) < critical
    assert 0.078 <= area(observed).min() and area(observed).max() <= 1.0  # 0.08-1 up to rounding
    # The position is uniform over the places the box fits.
    room = width - w + 1
    wide = room > 50
    position = (left[wide] + 0.5) / room[wide]
    assert _ks_distance(position, np.random.default_rng(1).uniform(size=200_000)) < critical * 1.5
    # A sampler with a uniform (not log-uniform) ratio is told apart: the test has power.
    wrong = _reference_boxes(width, height, 200_000, log_ratio=False)
    assert _ks_distance(log_ratio(observed), log_ratio(wrong)) > 1.5 * critical


def test_crop_box_uses_the_given_generator_as_the_global_rng_would() -> None:
    torch.manual_seed(5)
    from_global = [random_resized_crop_box(400, 300) for _ in range(20)]
    generator = torch.Generator().manual_seed(5)
    assert [random_resized_crop_box(400, 300, generator) for _ in range(20)] == from_global


@pytest.mark.parametrize(
    ("region", "minimum", "factor"),
    [
        ((400, 350), 32, 8),
        ((400, 350), 64, 4),
        ((400, 350), 100, 2),
        ((400, 350), 224, 1),
        ((256, 512), 64, 4),
        ((255, 512), 64, 2),
        ((64, 64), 64, 1),
        ((10, 10), 64, 1),
    ],
)
def test_draft_reduction(region: tuple[int, int], minimum: int, factor: int) -> None:
    assert draft_reduction(*region, minimum) == factor


def _full_decode_reference(path: Path, size: int, seed: int) -> np.ndarray:
    """Full-size decode, the same box and flip draws, one crop-and-resize."""
    generator = torch.Generator().manual_seed(seed)
    with Image.open(path) as image:
        full = image.convert("RGB")
    left, top, w, h = random_resized_crop_box(full.width, full.height, generator)
    out = full.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if torch.rand((), generator=generator) < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.float64)


@pytest.mark.parametrize("size", [32, 64, 112])
def test_train_output_matches_full_decode_within_jpeg_scaling_error(
    jpegs: list[Path], size: int
) -> None:
    errors, reduced = [], 0
    for seed in range(24):
        path = jpegs[seed % len(jpegs)]
        with Image.open(path) as image:
            full_size = image.size
            out = train_transform(image, size, torch.Generator().manual_seed(seed))
            reduced += image.size != full_size  # the decoder really produced fewer pixels
        assert out.size == (size, size) and out.mode == "RGB"
        reference = _full_decode_reference(path, size, seed)
        errors.append(np.abs(np.asarray(out, dtype=np.float64) - reference).mean())
    assert reduced >= 12
    assert max(errors) < MAX_IMAGE_ERROR and np.mean(errors) < MAX_MEAN_ERROR, errors


def test_png_takes_the_full_path_exactly(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    for seed in range(5):
        with Image.open(path) as image:
            out = train_transform(image, 32, torch.Generator().manual_seed(seed))
        assert np.array_equal(
            np.asarray(out, dtype=np.float64), _full_decode_reference(path, 32, seed)
        )


def test_flip_probability_is_one_half(tmp_path: Path) -> None:
    path = tmp_path / "ramp.png"
    ramp = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (150, 1, 3))
    Image.fromarray(ramp).save(path)
    generator = torch.Generator().manual_seed(3)
    flips = 0
    for _ in range(400):
        with Image.open(path) as image:
            row = np.asarray(train_transform(image, 16, generator), dtype=np.int64)[8, :, 0]
        assert abs(int(row[-1] - row[0])) > 0
        flips += int(row[-1] < row[0])  # the ramp rises to the right unless flipped
    assert 160 <= flips <= 240  # 400 fair coins: within 4 standard deviations of 200


def test_eval_matches_full_resize_and_centre_crop(jpegs: list[Path]) -> None:
    size, resize, reduced = 56, 64, 0
    for path in jpegs:
        with Image.open(path) as image:
            width, height = image.size
            out = eval_transform(image, size, resize)
            factor = draft_reduction(width, height, resize)
            assert min(width, height) / factor >= resize
            assert image.size == (-(-width // factor), -(-height // factor))
            reduced += factor > 1
        with Image.open(path) as image:
            full = image.convert("RGB")
        if width <= height:
            new = (resize, int(resize * height / width))
        else:
            new = (int(resize * width / height), resize)
        left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
        reference = full.resize(new, Image.Resampling.BILINEAR)
        reference = reference.crop((left, top, left + size, top + size))
        error = np.abs(np.asarray(out, np.float64) - np.asarray(reference, np.float64)).mean()
        assert out.size == (size, size) and error < MAX_IMAGE_ERROR, error
    assert reduced >= len(jpegs) // 2


def test_to_uint8_chw() -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    x = to_uint8_chw(Image.fromarray(pixels))
    assert x.dtype == torch.uint8 and x.shape == (3, 2, 3) and x.is_contiguous()
    assert torch.equal(x, torch.from_numpy(pixels).permute(2, 0, 1))


def test_dataset_sample_draws_from_the_given_generator(jpegs: list[Path]) -> None:
    train = imagenet(root=str(jpegs[0].parents[2]), image_size=24, eval_resize=28).train
    a, label_a = train.sample(2, torch.Generator().manual_seed(7))
    b, label_b = train.sample(2, torch.Generator().manual_seed(7))
    c, _ = train.sample(2, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and int(label_a) == int(label_b) == train.label(2)
    assert not torch.equal(a, c)
    torch.manual_seed(7)
    assert torch.equal(train[2][0], a)  # None: the global RNG, the same draws
    state = torch.get_rng_state()
    train.sample(3, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # a given generator leaves the global one


def test_encoded_bytes_and_skipping(jpegs: list[Path], tmp_path: Path) -> None:
    train = imagenet(root=str(jpegs[0].parents[2]), image_size=24, eval_resize=28).train
    data, label = train.encoded(1)
    assert data.dtype == np.uint8 and data.tobytes() == train.path(1).read_bytes()
    assert label == train.label(1)
    train.max_bad_fraction = 0.5
    original = train.path(0).read_bytes()
    try:
        train.path(0).write_bytes(b"not a jpeg")
        data, label = train.encoded(0)
        assert data.tobytes() == train.path(1).read_bytes() and label == train.label(1)
        assert train.skipped == 1 and train.bad_files == {str(train.path(0))}
    finally:
        train.path(0).write_bytes(original)
