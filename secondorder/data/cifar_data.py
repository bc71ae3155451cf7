"""CIFAR-10 from the standard python pickle batches, read without running code.

The batches are pickles, and a plain ``pickle.load`` runs whatever a crafted file asks for (a
real hole on shared cluster storage). :class:`_BatchUnpickler` admits only what the published
files hold: plain containers, bytes, numbers and numpy arrays with the numpy functions that
rebuild them. Any other global is refused before it is looked up, so nothing else is constructed.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from secondorder.data.core import DataBundle, DataError, DataSpec

try:  # numpy >= 2 keeps the functions arrays are pickled with in numpy._core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10Dataset", "cifar10", "cifar10_spec"]

# Per-channel statistics of the CIFAR-10 training images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILE = "test_batch"
_NUM_CLASSES = 10
_SIZE = 32
_PADDING = 4


class CIFAR10Dataset(Dataset):
    """CIFAR-style images kept as uint8 in memory and normalised per batch.

    Args:
        images: uint8 tensor of shape ``(N, 3, H, W)``.
        labels: int64 tensor of shape ``(N,)``.
        augment: Apply random crop (padding 4, zero padded before normalisation) and random
            horizontal flip, drawn from torch's global RNG.
        mean: Per-channel mean subtracted after scaling to ``[0, 1]``.
        std: Per-channel standard deviation divided by after subtracting the mean.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        augment: bool,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.augment = augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([index]))
        return x[0], y[0]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns normalised (and, if enabled, augmented) images and labels at ``indices``.

        Args:
            indices: One-dimensional integer tensor of sample indices.

        Returns:
            float32 images of shape ``(B, 3, H, W)`` and int64 labels of shape ``(B,)``.
        """
        indices = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[indices].to(torch.float32).div_(255.0)
        if self.augment:
            x = random_crop_flip(x, padding=_PADDING)
        x = x.sub_(self.mean).div_(self.std)
        return x, self.labels[indices]


def random_crop_flip(x: torch.Tensor, *, padding: int) -> torch.Tensor:
    """Randomly crops each image after zero padding, then flips half of them horizontally.

    Args:
        x: Images of shape ``(B, C, H, W)``.
        padding: Zero padding added on every side before cropping back to ``(H, W)``.

    Returns:
        Augmented images with the same shape; the randomness comes from torch's global RNG.
    """
    batch, _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch,))
    left = torch.randint(0, 2 * padding + 1, (batch,))
    flip = torch.rand(batch) < 0.5
    rows = (top[:, None] + torch.arange(height))[:, :, None]  # (B, H, 1)
    cols = left[:, None] + torch.arange(width)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # (B, 1, W)
    batch_ix = torch.arange(batch)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 puts the broadcast (B, H, W) dims first: (B, H, W, C).
    out = padded.permute(0, 2, 3, 1)[batch_ix, rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


def cifar10_spec(**_: object) -> DataSpec:
    """What :func:`cifar10` produces; the split sizes are the files'."""
    return DataSpec(input_shape=(3, _SIZE, _SIZE), num_classes=_NUM_CLASSES)


def cifar10(*, root: str = "data/cifar-10-batches-py", augment: bool = True) -> DataBundle:
    """Loads CIFAR-10 from the python pickle batches in ``root``.

    ``root`` must contain ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, each a
    pickled dict with ``b"data"`` (uint8, ``(N, 3072)``, channel-major) and ``b"labels"``.
    Images stay uint8 in memory; ``get_batch`` scales them to ``[0, 1]`` and normalises with
    the per-channel CIFAR-10 mean and std. The files are read by a restricted unpickler: a
    file that asks for anything but containers, numbers, bytes and numpy arrays is refused.

    Args:
        root: Directory holding the extracted ``cifar-10-batches-py`` files.
        augment: Random crop (padding 4) and horizontal flip for the train split; the eval
            split is never augmented.

    Returns:
        A bundle with 50000 train and 10000 eval images of shape ``(3, 32, 32)``.

    Raises:
        DataError: If the directory or a file is missing, unreadable, refers to code, or has the
            wrong layout.
    """
    directory = Path(root)
    if not directory.is_dir():
        raise DataError(
            f"CIFAR-10 directory {directory} does not exist; download and extract "
            "cifar-10-python.tar.gz there (it should contain data_batch_1..5 and test_batch)"
        )
    parts = [_read_batch(directory / name) for name in _TRAIN_FILES]
    train_x = torch.from_numpy(np.concatenate([images for images, _ in parts]))
    train_y = torch.from_numpy(np.concatenate([labels for _, labels in parts]))
    test_x, test_y = _read_batch(directory / _TEST_FILE)
    train = CIFAR10Dataset(train_x, train_y, augment=augment)
    evaluation = CIFAR10Dataset(torch.from_numpy(test_x), torch.from_numpy(test_y), augment=False)
    return DataBundle(
        train=train,
        eval=evaluation,
        num_classes=_NUM_CLASSES,
        input_shape=(3, _SIZE, _SIZE),
        description=(
            f"CIFAR-10 from {directory}: {len(train)} train / {len(evaluation)} eval images, "
            f"augment={augment}"
        ),
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one pickle batch into uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch file {path} is missing")
    try:
        with path.open("rb") as handle:
            batch: Any = _BatchUnpickler(handle, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise DataError(
            f"CIFAR-10 batch file {path} refers to {err}, which a data batch has no need of; "
            "refused without running it (the file is corrupt or was crafted)"
        ) from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a data problem
        raise DataError(
            f"cannot read CIFAR-10 batch file {path} ({type(err).__name__}: {err}); "
            "it may be truncated or corrupt"
        ) from err
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 batch file {path} holds a {type(batch).__name__}, not a dict")
    data = _get_key(batch, "data", path)
    labels = _get_key(batch, "labels", path)
    data = np.asarray(data)
    pixels = 3 * _SIZE * _SIZE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DataError(
            f"CIFAR-10 batch file {path}: data has dtype {data.dtype} and shape {data.shape}, "
            f"expected uint8 of shape (N, {pixels})"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataError(f"CIFAR-10 batch file {path}: labels are not integers ({err})") from err
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"CIFAR-10 batch file {path}: {labels.shape} labels for {data.shape[0]} images"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
        raise DataError(
            f"CIFAR-10 batch file {path}: labels outside [0, {_NUM_CLASSES}) "
            f"(min {labels.min()}, max {labels.max()})"
        )
    return np.ascontiguousarray(data.reshape(-1, 3, _SIZE, _SIZE)), labels


def _get_key(batch: dict[Any, Any], key: str, path: Path) -> Any:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise DataError(f"CIFAR-10 batch file {path} has no {key!r} entry")


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list; the message is its dotted name."""


def _latin1_encode(text: str, encoding: str) -> bytes:
    # Python 3 pickles bytes as ``_codecs.encode(text, "latin1")`` at protocols below 3.
    if encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    """The globals the published batches (and re-saved copies, any protocol) need."""
    allowed: dict[tuple[str, str], Callable[..., Any] | type] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x spell the module apart
        allowed[(f"{package}.multiarray", "_reconstruct")] = _multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = _multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = _numeric._frombuffer
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain containers, bytes, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None
