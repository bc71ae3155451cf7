"""Train and eval image transforms that decode JPEGs at reduced scale when the output allows it.

The train transform is a RandomResizedCrop (scale 0.08-1, aspect ratio 3/4-4/3, drawn as
torchvision draws them) followed by a random horizontal flip. The crop box is drawn on the full
image size, read from the file's header (PIL opens lazily), before any pixel is decoded. A JPEG
is then decoded with DCT scaling (PIL's ``Image.draft``: 1/2, 1/4 or 1/8 of each side, as
libjpeg does it, the way FFCV and DALI's region-of-interest decoding save work) by the largest
factor that keeps the crop at least ``image_size`` on both sides, the box is mapped into the
reduced image, and one ``resize(..., box=...)`` crops and resizes. DCT scaling saves the inverse
transform, chroma upsampling and colour conversion of the dropped resolution, not the entropy
decoding that every coefficient still costs, so at photograph-like bit rates it saves a part of
the decode, not most of it; the output differs from full decode + the same box only by the JPEG
scaling error. The other savings against the old path are the uint8 hand-over (no float
normalisation on the CPU) and no RGB copy of an image that is already RGB.

The eval transform decodes at the largest reduction that keeps the shorter side at least
``eval_resize``, resizes the shorter side to ``eval_resize`` and takes the centre crop.

Other formats have no reduced decoding and take the full path. Outputs are uint8 HxWxC PIL
images; :func:`to_uint8_chw` makes the tensor that is handed to the trainer, which converts and
normalises on its device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CROP_RATIO",
    "CROP_SCALE",
    "draft_reduction",
    "eval_transform",
    "random_resized_crop_box",
    "to_uint8_chw",
    "train_transform",
]

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_REDUCTIONS = (8, 4, 2)


def random_resized_crop_box(
    width: int, height: int, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """Samples ``(left, top, crop_width, crop_height)`` like torchvision's RandomResizedCrop:
    area fraction uniform in :data:`CROP_SCALE`, log aspect ratio uniform in the log of
    :data:`CROP_RATIO`, ten tries, then a centre crop with the ratio clamped into range.
    ``generator=None`` draws from torch's global RNG."""
    area = width * height
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target_area = area * float(torch.empty(()).uniform_(*CROP_SCALE, generator=generator))
        aspect = math.exp(float(torch.empty(()).uniform_(log_low, log_high, generator=generator)))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
            return left, top, crop_w, crop_h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        crop_w, crop_h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        crop_w, crop_h = int(round(height * CROP_RATIO[1])), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def draft_reduction(region_w: float, region_h: float, minimum: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2, else 1) that keeps a ``region_w x region_h``
    region of the full image at least ``minimum`` pixels on both sides once decoded."""
    for factor in _REDUCTIONS:
        if region_w / factor >= minimum and region_h / factor >= minimum:
            return factor
    return 1


def _draft(image: Image.Image, factor: int) -> float:
    """Asks the decoder for ``1/factor`` of each side; returns the scale it chose (1 for formats
    without reduced decoding). Must run before the pixels are loaded."""
    if factor == 1:
        return 1.0
    width, height = image.size
    # PIL picks the largest of 8, 4, 2, 1 not above min(width // w, height // h): asking for
    # (width // factor, height // factor) gives exactly `factor`.
    chosen = image.draft("RGB", (max(1, width // factor), max(1, height // factor)))
    if chosen is None:
        return 1.0
    _, box = chosen
    return width / box[2]


def _rgb(image: Image.Image) -> Image.Image:
    """The image in RGB; an RGB image as it is (``convert`` would copy it)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def train_transform(
    image: Image.Image, size: int, generator: torch.Generator | None = None
) -> Image.Image:
    """Random resized crop to ``size x size`` and a random horizontal flip of an opened, not yet
    loaded ``image``, decoded at reduced scale where the crop allows it."""
    width, height = image.size
    left, top, crop_w, crop_h = random_resized_crop_box(width, height, generator)
    scale = _draft(image, draft_reduction(crop_w, crop_h, size))
    box = (left / scale, top / scale, (left + crop_w) / scale, (top + crop_h) / scale)
    image = _rgb(image).resize((size, size), Image.Resampling.BILINEAR, box=box)
    if torch.rand((), generator=generator) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def eval_transform(image: Image.Image, size: int, resize: int) -> Image.Image:
    """Shorter side to ``resize`` (bilinear), then the centre ``size x size`` crop, decoding at
    the largest reduction that keeps the shorter side at least ``resize``."""
    width, height = image.size
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    scale = _draft(image, draft_reduction(width, height, resize))
    image = _rgb(image)
    if scale != 1.0:
        box = (0.0, 0.0, width / scale, height / scale)
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, box=box)
    elif (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """A contiguous uint8 ``3 x H x W`` tensor of an RGB image."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
