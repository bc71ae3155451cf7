"""Tests for the CIFAR-10 pickle reader."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from secondorder.data import DataError, cifar10
from secondorder.data.cifar_data import CIFAR10_MEAN, CIFAR10_STD

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
PER_FILE = 3


def _write_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with path.open("wb") as handle:
        pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, handle)


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i, name in enumerate([*TRAIN_FILES, "test_batch"]):
        count = 4 if name == "test_batch" else PER_FILE
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(count) + i) % 10]
        _write_batch(root / name, data, labels)
    return root


def _load_raw(path: Path) -> tuple[np.ndarray, list[int]]:
    with path.open("rb") as handle:
        batch = pickle.load(handle)
    return batch[b"data"], batch[b"labels"]


def _normalise(raw: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(raw.reshape(-1, 3, 32, 32)).float() / 255.0
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_round_trip_values(cifar_root: Path) -> None:
    bundle = cifar10(root=str(cifar_root), augment=False)
    assert bundle.num_classes == 10 and bundle.input_shape == (3, 32, 32)
    assert len(bundle.train) == 5 * PER_FILE and len(bundle.eval) == 4
    raw = np.concatenate([_load_raw(cifar_root / name)[0] for name in TRAIN_FILES])
    labels = sum((_load_raw(cifar_root / name)[1] for name in TRAIN_FILES), [])
    expected = _normalise(raw)
    for i in range(len(bundle.train)):
        x, y = bundle.train[i]
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.dim() == 0
        torch.testing.assert_close(x, expected[i])
        assert int(y) == labels[i]
    test_raw, test_labels = _load_raw(cifar_root / "test_batch")
    xb, yb = bundle.eval.get_batch(torch.arange(4))
    torch.testing.assert_close(xb, _normalise(test_raw))
    assert yb.tolist() == test_labels
    # Channel-major layout: the first 1024 bytes are the red plane.
    assert bundle.train.images[0, 0, 0, 1] == raw[0, 1]
    assert bundle.train.images[0, 1, 0, 0] == raw[0, 1024]


def test_get_batch_equals_getitem_without_augmentation(cifar_root: Path) -> None:
    train = cifar10(root=str(cifar_root), augment=False).train
    indices = torch.tensor([4, 0, 14, 4])
    xb, yb = train.get_batch(indices)
    assert torch.equal(xb, torch.stack([train[int(i)][0] for i in indices]))
    assert torch.equal(yb, torch.stack([train[int(i)][1] for i in indices]))


def test_eval_split_is_never_augmented(cifar_root: Path) -> None:
    bundle = cifar10(root=str(cifar_root), augment=True)
    first = bundle.eval.get_batch(torch.arange(4))[0]
    assert torch.equal(first, bundle.eval.get_batch(torch.arange(4))[0])


def test_augmentation_is_a_padded_crop_and_flip(cifar_root: Path) -> None:
    train = cifar10(root=str(cifar_root), augment=True).train
    indices = torch.arange(len(train))
    plain = train.images[indices].float() / 255.0
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.manual_seed(0)
    seen_flip, seen_shift = False, False
    for _ in range(4):
        xb, yb = train.get_batch(indices)
        assert xb.shape == (len(train), 3, 32, 32) and torch.equal(yb, train.labels)
        for b in range(len(train)):
            matches = [
                (top, left, flip)
                for top in range(9)
                for left in range(9)
                for flip in (False, True)
                if torch.allclose(
                    xb[b],
                    (
                        (lambda c: c.flip(-1) if flip else c)(
                            padded[b, :, top : top + 32, left : left + 32]
                        )
                        - mean
                    )
                    / std,
                    atol=1e-5,
                )
            ]
            assert matches, f"sample {b} is not a crop/flip of its image"
            seen_flip |= any(flip for _, _, flip in matches)
            seen_shift |= any((top, left) != (4, 4) for top, left, _ in matches)
    assert seen_flip and seen_shift


def test_augmentation_uses_global_rng(cifar_root: Path) -> None:
    train = cifar10(root=str(cifar_root), augment=True).train
    torch.manual_seed(3)
    a = train.get_batch(torch.arange(6))[0]
    torch.manual_seed(3)
    b = train.get_batch(torch.arange(6))[0]
    assert torch.equal(a, b)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        cifar10(root=str(tmp_path / "nowhere"))


def test_missing_file(cifar_root: Path) -> None:
    (cifar_root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        cifar10(root=str(cifar_root))


def test_truncated_pickle(cifar_root: Path) -> None:
    path = cifar_root / "test_batch"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="test_batch"):
        cifar10(root=str(cifar_root))


def test_wrong_shape(cifar_root: Path) -> None:
    _write_batch(cifar_root / "data_batch_2", np.zeros((3, 3071), dtype=np.uint8), [0, 1, 2])
    with pytest.raises(DataError, match="data_batch_2.*3071"):
        cifar10(root=str(cifar_root))


def test_wrong_dtype(cifar_root: Path) -> None:
    _write_batch(cifar_root / "data_batch_1", np.zeros((3, 3072), dtype=np.float32), [0, 1, 2])
    with pytest.raises(DataError, match="data_batch_1"):
        cifar10(root=str(cifar_root))


@pytest.mark.parametrize("labels", [[0, 1, 10], [0, -1, 2], [0, 1]])
def test_bad_labels(cifar_root: Path, labels: list[int]) -> None:
    _write_batch(cifar_root / "data_batch_5", np.zeros((3, 3072), dtype=np.uint8), labels)
    with pytest.raises(DataError, match="data_batch_5"):
        cifar10(root=str(cifar_root))


def test_not_a_dict(cifar_root: Path) -> None:
    with (cifar_root / "data_batch_4").open("wb") as handle:
        pickle.dump([1, 2, 3], handle)
    with pytest.raises(DataError, match="data_batch_4"):
        cifar10(root=str(cifar_root))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_reader_loads_batches_of_every_protocol(tmp_path: Path, protocol: int) -> None:
    """The allow-list covers how numpy arrays, bytes and numpy integers pickle at any protocol."""
    root = tmp_path / "cifar"
    root.mkdir()
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    labels = [np.int64(3), 7]
    for name in [*TRAIN_FILES, "test_batch"]:
        with (root / name).open("wb") as handle:
            batch = {b"batch_label": b"x", b"data": data, b"labels": labels, b"filenames": [b"a"]}
            pickle.dump(batch, handle, protocol=protocol)
    bundle = cifar10(root=str(root), augment=False)
    assert torch.equal(bundle.eval.images.flatten(1), torch.from_numpy(data))
    assert bundle.eval.labels.tolist() == [3, 7]
