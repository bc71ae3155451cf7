"""ImageNet-style image folders decoded with PIL.

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (images may sit in
nested sub-folders of a class folder). Class indices follow the sorted train class folder
names. Files whose extension is not a known image extension are ignored, as are hidden
entries (names starting with ``.``).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from secondorder.data.core import DataBundle, DataError, DataSpec
from secondorder.data.image_transforms import eval_transform, to_uint8_chw, train_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "imagenet",
    "imagenet_spec",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
)


class ImageFolderDataset(Dataset):
    """Images listed by path, decoded and transformed on access into uint8 ``3 x S x S`` tensors.

    Train mode applies a random resized crop (scale 0.08-1, aspect ratio 3/4-4/3) to
    ``image_size`` and a random horizontal flip; eval mode resizes the shorter side to
    ``eval_resize`` and takes the centre ``image_size`` crop. JPEGs are decoded at reduced scale
    where the output allows it (see :mod:`secondorder.data.image_transforms`). Images are handed
    over as uint8, a quarter of float32's bytes to move between processes and to the device;
    the consumer converts them with :attr:`normalization` (``x / 255``, then ``(x - mean) /
    std``) where the batch will be used.

    Unreadable images are skipped: the next readable index (cyclically) is returned instead,
    and the file is remembered in :attr:`bad_files` (this process) and in a bitmap in shared
    memory, so :attr:`skipped` counts the distinct files skipped by this process and its
    DataLoader workers together; the trainer records it. Once more than
    ``max_bad_fraction * len(self)`` distinct files have failed, :class:`DataError` is raised.

    Args:
        root: Directory the relative paths are resolved against.
        paths: Paths of the images relative to ``root``.
        labels: Class index of each image.
        train: Use the random train transform instead of the deterministic eval transform.
        image_size: Side of the square output.
        eval_resize: Length of the shorter side before the eval centre crop.
        max_bad_fraction: Tolerated fraction of unreadable files.
    """

    normalization: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        IMAGENET_MEAN,
        IMAGENET_STD,
    )

    def __init__(
        self,
        root: Path,
        paths: list[str],
        labels: list[int],
        *,
        train: bool,
        image_size: int,
        eval_resize: int,
        max_bad_fraction: float,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.root = Path(root)
        # One fixed-width bytes array instead of a list of str objects: compact, and DataLoader
        # workers do not slowly copy it through reference counting (copy-on-write).
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.train = train
        self.image_size = image_size
        self.eval_resize = eval_resize
        self.max_bad_fraction = max_bad_fraction
        self.bad_files: set[str] = set()
        # One flag per image in shared memory: DataLoader workers (forked or spawned) mark the
        # same pages, so the count and the max_bad_fraction limit cover all of them.
        self._bad = torch.zeros(len(self._labels), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    @property
    def skipped(self) -> int:
        """Distinct unreadable images skipped so far, by this process and its workers."""
        return int(self._bad.sum())

    def path(self, index: int) -> Path:
        """Returns the full path of image ``index``."""
        return self.root / os.fsdecode(bytes(self._paths[index]))

    def label(self, index: int) -> int:
        """Returns the class index of image ``index``."""
        return int(self._labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(index, None)

    def sample(
        self, index: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 image, int64 label)`` of image ``index`` (or of the next readable one), with
        every random draw of the train transform taken from ``generator`` (``None``: torch's
        global RNG), so a loader can make augmentation independent of which process decodes."""
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for {count} images")
        index %= count
        for attempt in range(count):
            current = (index + attempt) % count
            path = self.path(current)
            image = self._decode(path, current, generator)
            if image is not None:
                return to_uint8_chw(image), torch.tensor(self.label(current), dtype=torch.int64)
        raise DataError(f"none of the {count} images under {self.root} can be read")

    def encoded(self, index: int) -> tuple[np.ndarray, int]:
        """The file bytes (uint8) and label of image ``index``, or of the next file whose header
        reads (skipped and counted as :meth:`sample` does), for a decoder elsewhere (DALI)."""
        count = len(self)
        index %= count
        for attempt in range(count):
            current = (index + attempt) % count
            path = self.path(current)
            try:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)):
                    pass
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
                self._record_bad(path, current, err)
                continue
            return np.frombuffer(data, dtype=np.uint8), self.label(current)
        raise DataError(f"none of the {count} images under {self.root} can be read")

    def _decode(
        self, path: Path, index: int, generator: torch.Generator | None
    ) -> Image.Image | None:
        try:
            with Image.open(path) as image:
                if self.train:
                    return train_transform(image, self.image_size, generator)
                return eval_transform(image, self.image_size, self.eval_resize)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
            self._record_bad(path, index, err)
            return None

    def _record_bad(self, path: Path, index: int, err: Exception) -> None:
        name = str(path)
        if name not in self.bad_files:
            self.bad_files.add(name)
            logger.warning("skipping unreadable image %s (%s: %s)", name, type(err).__name__, err)
        self._bad[index] = True
        bad = self.skipped
        if bad > self.max_bad_fraction * len(self):
            raise DataError(
                f"{bad} unreadable images under {self.root}, more than "
                f"max_bad_fraction={self.max_bad_fraction} of {len(self)} allows; last bad file: "
                f"{name} ({type(err).__name__}: {err})"
            ) from err


def imagenet_spec(
    *, root: str, image_size: int, eval_resize: int, max_bad_fraction: float, **_: object
) -> DataSpec:
    """What :func:`imagenet` makes of these arguments, without reading an image: the class count
    is that of the train class folders when they are there (one directory listing).

    Raises:
        ValueError: If a size or fraction is out of range.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if eval_resize < image_size:
        raise ValueError(f"eval_resize ({eval_resize}) must be at least image_size ({image_size})")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    num_classes = None
    train = Path(root) / "train"
    if train.is_dir():
        with os.scandir(train) as entries:
            names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        num_classes = len(names) or None
    return DataSpec(input_shape=(3, image_size, image_size), num_classes=num_classes)


def imagenet(
    *,
    root: str = "data/imagenet",
    image_size: int = 224,
    eval_resize: int = 256,
    max_bad_fraction: float = 0.001,
) -> DataBundle:
    """Indexes an ImageNet-style folder tree (images are decoded lazily).

    Args:
        root: Directory containing ``train/`` and ``val/`` with one folder per class.
        image_size: Side of the square network input.
        eval_resize: Shorter-side length before the eval centre crop (at least ``image_size``).
        max_bad_fraction: Fraction of unreadable images tolerated per split before failing.

    Returns:
        A bundle of two :class:`ImageFolderDataset`; it has no ``get_batch``, so the trainer
        loads it through a DataLoader.

    Raises:
        DataError: If ``root`` or a split is missing or empty, a file sits directly in a split
            folder, or a val class is not a train class.
        ValueError: If a size or fraction is out of range.
    """
    imagenet_spec(
        root=root,
        image_size=image_size,
        eval_resize=eval_resize,
        max_bad_fraction=max_bad_fraction,
    )
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"ImageNet directory {base} does not exist")
    train_classes = _class_dirs(base / "train")
    classes = sorted(train_classes)
    class_index = {name: i for i, name in enumerate(classes)}
    val_classes = _class_dirs(base / "val")
    for name in sorted(val_classes):
        if name not in class_index:
            raise DataError(
                f"validation class folder {base / 'val' / name} has no counterpart in "
                f"{base / 'train'}"
            )
    common = {
        "image_size": image_size,
        "eval_resize": eval_resize,
        "max_bad_fraction": max_bad_fraction,
    }
    train = _scan_split(base / "train", class_index, train=True, **common)
    evaluation = _scan_split(base / "val", class_index, train=False, **common)
    return DataBundle(
        train=train,
        eval=evaluation,
        num_classes=len(classes),
        input_shape=(3, image_size, image_size),
        description=(
            f"ImageNet folders at {base}: {len(train)} train / {len(evaluation)} val images, "
            f"{len(classes)} classes, image_size={image_size}, eval_resize={eval_resize}"
        ),
    )


def _class_dirs(split: Path) -> list[str]:
    """Returns the class folder names in ``split``; rejects stray files and missing folders."""
    if not split.is_dir():
        raise DataError(f"split directory {split} does not exist")
    names = []
    with os.scandir(split) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                raise DataError(
                    f"{Path(entry.path)} is a file directly inside {split}; images must be in "
                    f"per-class folders ({split}/<class>/<image>)"
                )
            names.append(entry.name)
    if not names:
        raise DataError(f"split directory {split} has no class folders")
    return names


def _scan_split(
    split: Path,
    class_index: dict[str, int],
    *,
    train: bool,
    image_size: int,
    eval_resize: int,
    max_bad_fraction: float,
) -> ImageFolderDataset:
    paths: list[str] = []
    labels: list[int] = []
    for name in sorted(os.listdir(split)):
        if name.startswith(".") or name not in class_index:
            continue
        class_dir = split / name
        for directory, subdirs, files in os.walk(class_dir, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            relative = Path(directory).relative_to(split)
            for file in sorted(files):
                if file.startswith(".") or Path(file).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                paths.append(str(relative / file))
                labels.append(class_index[name])
    if not paths:
        raise DataError(f"split directory {split} contains no images")
    return ImageFolderDataset(
        split,
        paths,
        labels,
        train=train,
        image_size=image_size,
        eval_resize=eval_resize,
        max_bad_fraction=max_bad_fraction,
    )
