"""Tests for MNIST-1D generation and its cache."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from secondorder.data import DataBundle, mnist1d, mnist1d_data

N = 600


def _cache_files(root: Path) -> list[Path]:
    return sorted((root / "mnist1d").glob("*.npz"))


def _same(a: DataBundle, b: DataBundle) -> bool:
    return all(
        torch.equal(getattr(sa, attr), getattr(sb, attr))
        for sa, sb in ((a.train, b.train), (a.eval, b.eval))
        for attr in ("x", "y")
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real generation, recording whether the caller's RNG states survived it."""
    root = tmp_path_factory.mktemp("mnist1d_a")
    np.random.seed(1234)
    random.seed(1234)
    np_before, py_before = np.random.get_state(), random.getstate()
    bundle = mnist1d(num_samples=N, root=str(root), progress=False)
    np_after, py_after = np.random.get_state(), random.getstate()
    np_same = all(
        np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v
        for u, v in zip(np_before, np_after, strict=True)
    )
    (cache,) = _cache_files(root)
    return {
        "root": root,
        "cache": cache,
        "bundle": bundle,
        "np_same": np_same,
        "py_same": py_before == py_after,
    }


def test_shapes_types_and_splits(generated: dict[str, Any]) -> None:
    bundle = generated["bundle"]
    assert bundle.num_classes == 10 and bundle.input_shape == (40,)
    assert len(bundle.train) == int(N * 0.8) and len(bundle.eval) == N - int(N * 0.8)
    x, y = bundle.train[0]
    assert x.shape == (40,) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.dim() == 0
    all_y = torch.cat([bundle.train.y, bundle.eval.y])
    assert torch.equal(torch.bincount(all_y), torch.full((10,), N // 10))
    # Disjoint: no test signal also appears in the train split (nor twice anywhere).
    train_rows = {row.tobytes() for row in bundle.train.x.numpy()}
    test_rows = {row.tobytes() for row in bundle.eval.x.numpy()}
    assert len(train_rows) == len(bundle.train) and len(test_rows) == len(bundle.eval)
    assert not train_rows & test_rows


def test_standard_scaling_uses_train_statistics(generated: dict[str, Any]) -> None:
    x = generated["bundle"].train.x.double()
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1.0) < 1e-5


def test_global_rng_state_untouched(generated: dict[str, Any]) -> None:
    assert generated["np_same"] and generated["py_same"]


def test_get_batch_matches_getitem(generated: dict[str, Any]) -> None:
    data = generated["bundle"].eval
    indices = torch.tensor([7, 0, 3, 3])
    xb, yb = data.get_batch(indices)
    assert torch.equal(xb, torch.stack([data[int(i)][0] for i in indices]))
    assert torch.equal(yb, torch.stack([data[int(i)][1] for i in indices]))


def test_second_call_hits_cache(generated: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    root = generated["root"]

    def fail(**kwargs: Any) -> None:
        raise AssertionError("generation should not run on a cache hit")

    monkeypatch.setattr(mnist1d_data, "_generate_raw", fail)
    again = mnist1d(num_samples=N, root=str(root), progress=False)
    assert _same(again, generated["bundle"])


def test_generation_is_deterministic(generated: dict[str, Any], tmp_path: Path) -> None:
    fresh = mnist1d(num_samples=N, root=str(tmp_path), progress=False)
    assert _same(fresh, generated["bundle"])
    assert [p.name for p in _cache_files(tmp_path)] == [generated["cache"].name]


def test_different_seed_differs(generated: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "mnist1d").mkdir()
    shutil.copy(generated["cache"], tmp_path / "mnist1d" / generated["cache"].name)
    other = mnist1d(num_samples=N, root=str(tmp_path), seed=7, progress=False)
    assert not torch.equal(other.train.x, generated["bundle"].train.x)
    assert len(_cache_files(tmp_path)) == 2  # the cache is keyed by the arguments


def test_unit_scale_in_unit_interval(tmp_path: Path) -> None:
    bundle = mnist1d(num_samples=N, root=str(tmp_path), scale="unit", progress=False)
    for split in (bundle.train, bundle.eval):
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
    assert float(bundle.train.x.min()) == 0.0 and float(bundle.train.x.max()) == 1.0


def test_truncated_cache_is_regenerated(generated: dict[str, Any], tmp_path: Path) -> None:
    cache = generated["cache"]
    target = tmp_path / "mnist1d" / cache.name
    target.parent.mkdir()
    shutil.copy(cache, target)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.warns(UserWarning, match="regenerating"):
        bundle = mnist1d(num_samples=N, root=str(tmp_path), progress=False)
    assert _same(bundle, generated["bundle"])
    assert target.read_bytes() == cache.read_bytes()  # repaired on disk
    assert not list(target.parent.glob("*.tmp"))


def test_garbage_cache_is_regenerated(generated: dict[str, Any], tmp_path: Path) -> None:
    cache = generated["cache"]
    target = tmp_path / "mnist1d" / cache.name
    target.parent.mkdir()
    target.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match=cache.name):
        bundle = mnist1d(num_samples=N, root=str(tmp_path), progress=False)
    assert _same(bundle, generated["bundle"])


def test_concurrent_callers_generate_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_generate = mnist1d_data._generate

    def slow_generate(meta: dict[str, Any], *, progress: bool) -> dict[str, np.ndarray]:
        calls.append(1)
        time.sleep(0.3)  # long enough for the other caller to block on the lock
        return real_generate(meta, progress=progress)

    def fake_raw(*, num_samples: int, seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        return rng.normal(size=(num_samples, 40)), np.arange(num_samples) % 10

    monkeypatch.setattr(mnist1d_data, "_generate", slow_generate)
    monkeypatch.setattr(mnist1d_data, "_generate_raw", fake_raw)
    results: list[DataBundle] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(mnist1d(num_samples=100, root=str(tmp_path), progress=False))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(calls) == 1
    assert len(results) == 3 and all(_same(r, results[0]) for r in results)
    assert len(_cache_files(tmp_path)) == 1


def test_unwritable_cache_dir_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_raw(*, num_samples: int, seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        return np.random.default_rng(seed).normal(size=(num_samples, 40)), np.arange(
            num_samples
        ) % 10

    monkeypatch.setattr(mnist1d_data, "_generate_raw", fake_raw)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data directory should be")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = mnist1d(num_samples=50, root=str(blocker), progress=False)
    assert len(bundle.train) == 40
    assert any(str(blocker) in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": "minmax"},
        {"train_split": 1.0},
        {"train_split": 0.0},
        {"num_samples": 1},
        {"seed": -1},
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        mnist1d(root=str(tmp_path), progress=False, **kwargs)


def _generate_in_child(root: str, marker: str) -> None:
    def fake_raw(*, num_samples: int, seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        with open(marker, "a") as handle:
            handle.write("generated\n")
        time.sleep(0.5)
        return np.random.default_rng(seed).normal(size=(num_samples, 40)), np.arange(
            num_samples
        ) % 10

    mnist1d_data._generate_raw = fake_raw  # only in this forked child
    bundle = mnist1d(num_samples=100, root=root, progress=False)
    np.save(f"{marker}.{os.getpid()}.npy", bundle.train.x.numpy())


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_concurrent_processes_generate_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    marker = str(tmp_path / "marker")
    procs = [
        context.Process(target=_generate_in_child, args=(str(tmp_path / "data"), marker))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert Path(marker).read_text() == "generated\n"
    first, second = (np.load(path) for path in sorted(tmp_path.glob("marker.*.npy")))
    assert np.array_equal(first, second)
