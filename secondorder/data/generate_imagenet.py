"""Write a generated ImageNet-format folder of JPEGs, for tests and input-pipeline benchmarks.

The images are made to cost what real ImageNet photographs cost to decode and transform, not
to be learnable: sizes drawn around ImageNet's mean of about 400x350 pixels with varied aspect
ratios (landscape more often than portrait, as in ImageNet), JPEG quality 90, and content with
both smooth regions and fine texture, so the encoded size per pixel (and with it the entropy
decoding work) is of a photograph's order rather than a flat colour's. Each class has its own
palette, so a model can still tell classes apart in a smoke test.

Everything is drawn from ``numpy.random.default_rng((seed, split, class, index))``: the same
seed writes byte-identical files, whatever order or process writes them.

    python -m secondorder.data.generate_imagenet ROOT --classes 10 --train-per-class 50 \\
        --val-per-class 10 --seed 0

writes ``ROOT/train/n0000000<c>/<c>_<i>.JPEG`` and ``ROOT/val/...``, the layout
``data=imagenet data.root=ROOT`` reads.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ImageSizes", "class_name", "draw_size", "generate", "image", "main"]

SPLITS = ("train", "val")


@dataclass(frozen=True)
class ImageSizes:
    """The size distribution: ``sqrt(width * height)`` normal around ``mean_side`` (clipped to
    ``[min_side, max_side]``), the aspect ratio ``width / height`` log-normal around
    ``mean_aspect``. The defaults give a mean near 400x350 with most ratios in 3/4-16/9."""

    mean_side: float = 370.0
    std_side: float = 70.0
    min_side: float = 120.0
    max_side: float = 640.0
    mean_aspect: float = 1.15
    log_aspect_std: float = 0.2


def class_name(index: int) -> str:
    """ImageNet-style folder name (a WordNet id's shape)."""
    return f"n{index:08d}"


def draw_size(rng: np.random.Generator, sizes: ImageSizes = ImageSizes()) -> tuple[int, int]:
    """``(width, height)`` of one image."""
    side = float(
        np.clip(rng.normal(sizes.mean_side, sizes.std_side), sizes.min_side, sizes.max_side)
    )
    aspect = float(np.exp(rng.normal(np.log(sizes.mean_aspect), sizes.log_aspect_std)))
    width = max(16, round(side * np.sqrt(aspect)))
    height = max(16, round(side / np.sqrt(aspect)))
    return width, height


def image(rng: np.random.Generator, size: tuple[int, int], palette: np.ndarray) -> Image.Image:
    """One picture: smooth gradients between the class's colours, a few blobs, and texture."""
    width, height = size
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)), 0.0, 1.0)
    pixels = (1 - t)[..., None] * palette[0] + t[..., None] * palette[1]
    for _ in range(int(rng.integers(3, 8))):  # soft blobs: large smooth structures
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        pixels = pixels * (1 - weight) + weight * rng.uniform(0, 255, size=3).astype(np.float32)
    # Fine texture: what makes a photograph's JPEG large and slow to decode.
    pixels += rng.normal(0.0, 18.0, size=(height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _palette(seed: int, label: int) -> np.ndarray:
    return (
        np.random.default_rng((seed, 1_000_003, label)).uniform(0, 255, (2, 3)).astype(np.float32)
    )


def generate(
    root: str | Path,
    *,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    seed: int = 0,
    quality: int = 90,
    sizes: ImageSizes = ImageSizes(),
) -> Path:
    """Write the folder (existing files with the same names are overwritten); returns ``root``.

    Raises:
        ValueError: a non-positive count or a JPEG quality outside 1-95.
    """
    if classes < 1 or train_per_class < 1 or val_per_class < 0:
        raise ValueError("need classes >= 1, train_per_class >= 1 and val_per_class >= 0")
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must be in 1-95, got {quality}")
    root = Path(root)
    counts = {"train": train_per_class, "val": val_per_class}
    for split_index, split in enumerate(SPLITS):
        for label in range(classes):
            folder = root / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            palette = _palette(seed, label)
            for i in range(counts[split]):
                rng = np.random.default_rng((seed, split_index, label, i))
                picture = image(rng, draw_size(rng, sizes), palette)
                picture.save(folder / f"{label}_{i}.JPEG", quality=quality)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m secondorder.data.generate_imagenet",
        description="Write a generated ImageNet-format folder of JPEGs (ImageNet-like sizes).",
    )
    parser.add_argument("root", help="folder to write (root/train/<class>/, root/val/<class>/)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (ImageNet: ~90)")
    args = parser.parse_args(argv)
    try:
        generate(
            args.root,
            classes=args.classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            seed=args.seed,
            quality=args.quality,
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.classes} classes x ({args.train_per_class} train + {args.val_per_class} "
        f"val) JPEGs under {args.root}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
