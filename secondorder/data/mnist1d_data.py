"""Procedurally generated MNIST-1D with an on-disk cache.

The data is generated with the transforms of the ``mnist1d`` package (never its download path)
and cached as ``.npz`` so that later runs, and other ranks of the same run, load it instantly.

Generation
    Sample ``i`` gets label ``i % 10`` (so classes are balanced to within one sample) and is
    produced by ``mnist1d.transform.transform`` applied to the template of its digit. Samples
    are generated in chunks of ``CHUNK_SIZE``; the global numpy RNG, which ``mnist1d`` draws
    from, is seeded per chunk from ``(seed, chunk index)`` so that the result does not depend on
    anything but the arguments. The caller's global numpy and python ``random`` states are saved
    before and restored after generation. The samples are then shuffled with a permutation
    drawn from ``seed`` and split into disjoint train (first ``int(N * train_split)``) and test
    parts.

Scaling
    ``scale="standard"``: subtract the mean and divide by the standard deviation, both single
    scalars computed over the *train split only* (so no test statistics leak into training),
    like the original MNIST-1D which uses one global mean and std. ``scale="unit"``: min-max
    scale with the train split's minimum and maximum and clip everything to ``[0, 1]`` (use
    this for Bernoulli/BCE-loss autoencoders). ``scale="none"``: the raw signal.

Caching and concurrency
    The cache lives at ``<root>/mnist1d/mnist1d_<hash>.npz`` where ``<hash>`` covers every
    generation argument (``num_samples``, ``seed``, ``train_split``, ``scale``, the chunk size,
    all ``mnist1d`` transform parameters, the cache format and the ``mnist1d`` version); the
    arguments are also stored inside the file and checked on load. Files are written to a
    temporary file in the same directory and moved into place with ``os.replace``, so readers
    never see a partial file. Before generating, a process takes an exclusive ``fcntl.flock`` on
    ``mnist1d_<hash>.lock`` next to the cache and re-checks the cache, so when several processes
    (e.g. training ranks) start together exactly one generates and the others wait and load.

Recovery
    A cache file that cannot be read or fails validation (truncated, corrupt, wrong contents)
    is regenerated and overwritten, with a ``UserWarning`` naming the file. If the cache
    directory cannot be created or written, the data is generated in memory with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secondorder.data.core import DataBundle, DataSpec, TensorPairDataset

try:  # pragma: no cover - always available on Linux/macOS
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["CHUNK_SIZE", "NUM_CLASSES", "SEQ_LEN", "SCALES", "mnist1d", "mnist1d_spec"]

NUM_CLASSES = 10
SEQ_LEN = 40
CHUNK_SIZE = 5000
SCALES = ("standard", "unit", "none")
_FORMAT_VERSION = 1

# The transform parameters of mnist1d's ``get_dataset_args`` (without its download URL), pinned
# here so that cached data does not silently change if the package changes its defaults.
_TRANSFORM_ARGS: dict[str, Any] = {
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": SEQ_LEN,
}
_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def mnist1d(
    *,
    num_samples: int = 10000,
    root: str = "data",
    seed: int = 42,
    train_split: float = 0.8,
    scale: str = "standard",
    progress: bool = True,
) -> DataBundle:
    """Builds (or loads from cache) the MNIST-1D dataset.

    Args:
        num_samples: Total number of samples, train and test together.
        root: Data directory; the cache goes to ``<root>/mnist1d/``.
        seed: Non-negative seed for generation and the train/test shuffle.
        train_split: Fraction of samples in the train split, in ``(0, 1)``.
        scale: ``"standard"`` (zero mean, unit std over the train split), ``"unit"`` (min-max
            to ``[0, 1]`` using the train split's range, clipped) or ``"none"``.
        progress: Show a tqdm progress bar while generating.

    Returns:
        A bundle of two :class:`TensorPairDataset` with float32 ``x`` of shape ``(n, 40)`` and
        int64 labels, ``num_classes=10`` and ``input_shape=(40,)``.

    Raises:
        ValueError: If an argument is out of range.
    """
    mnist1d_spec(num_samples=num_samples, seed=seed, train_split=train_split, scale=scale)
    meta = _cache_meta(num_samples=num_samples, seed=seed, train_split=train_split, scale=scale)
    arrays = _load_or_generate(Path(root) / "mnist1d", meta, progress=progress)
    train = TensorPairDataset(
        torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    )
    test = TensorPairDataset(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]))
    return DataBundle(
        train=train,
        eval=test,
        num_classes=NUM_CLASSES,
        input_shape=(SEQ_LEN,),
        description=(
            f"MNIST-1D: {len(train)} train / {len(test)} test samples of length {SEQ_LEN}, "
            f"{NUM_CLASSES} classes, scale={scale}, seed={seed}"
        ),
    )


def mnist1d_spec(
    *, num_samples: int, seed: int, train_split: float, scale: str, **_: object
) -> DataSpec:
    """What :func:`mnist1d` makes of these arguments; checks them without generating anything.

    Raises:
        ValueError: If an argument is out of range or a split would be empty.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 0.0 < train_split < 1.0:
        raise ValueError(
            f"train_split must be in (0, 1), got {train_split}: the rest is the evaluation split"
        )
    split_ix = int(num_samples * train_split)
    if not 0 < split_ix < num_samples:
        raise ValueError(
            f"train_split={train_split} leaves an empty split with num_samples={num_samples}"
        )
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
    return DataSpec(
        input_shape=(SEQ_LEN,),
        num_classes=NUM_CLASSES,
        train_samples=split_ix,
        eval_samples=num_samples - split_ix,
    )


def _cache_meta(*, num_samples: int, seed: int, train_split: float, scale: str) -> dict[str, Any]:
    try:
        version = metadata.version("mnist1d")
    except metadata.PackageNotFoundError:  # pragma: no cover - package missing
        version = "unknown"
    return {
        "format": _FORMAT_VERSION,
        "mnist1d_version": version,
        "num_samples": int(num_samples),
        "seed": int(seed),
        "train_split": float(train_split),
        "scale": scale,
        "chunk_size": CHUNK_SIZE,
        "transform_args": _TRANSFORM_ARGS,
    }


def _meta_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def cache_path_for(root: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Returns the cache file used for the generation arguments ``meta``."""
    digest = hashlib.sha256(_meta_json(meta).encode()).hexdigest()[:16]
    return Path(root) / f"mnist1d_{digest}.npz"


def _load_or_generate(
    cache_dir: Path, meta: dict[str, Any], *, progress: bool
) -> dict[str, np.ndarray]:
    path = cache_path_for(cache_dir, meta)
    # Fast path without the lock: files only appear complete thanks to the atomic rename.
    arrays, _ = _try_load(path, meta)
    if arrays is not None:
        return arrays
    stack = contextlib.ExitStack()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_exclusive_lock(path.with_suffix(".lock")))
    except OSError as err:
        warnings.warn(
            f"cannot use the MNIST-1D cache directory {cache_dir} ({err}); "
            "generating the data in memory without caching",
            stacklevel=3,
        )
        return _generate(meta, progress=progress)
    with stack:
        # Another process may have finished generating while we waited for the lock.
        arrays, error = _try_load(path, meta)
        if arrays is not None:
            return arrays
        if error is not None:
            warnings.warn(
                f"MNIST-1D cache file {path} is unusable ({error}); regenerating it",
                stacklevel=3,
            )
        arrays = _generate(meta, progress=progress)
        try:
            _atomic_save(path, arrays, meta)
        except OSError as err:
            warnings.warn(
                f"could not write the MNIST-1D cache file {path} ({err}); continuing uncached",
                stacklevel=3,
            )
        return arrays


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (created if needed) for the block's duration."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _try_load(path: Path, meta: dict[str, Any]) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """Loads and validates a cache file.

    Returns:
        ``(arrays, None)`` on success, ``(None, None)`` if the file does not exist and
        ``(None, reason)`` if it exists but is unusable.
    """
    if not path.exists():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored_meta = str(npz["meta"][()])
            arrays = {key: np.array(npz[key]) for key in _ARRAY_KEYS}
    except Exception as err:  # noqa: BLE001 - any read failure means "regenerate"
        return None, f"{type(err).__name__}: {err}"
    if stored_meta != _meta_json(meta):
        return None, "stored generation arguments do not match"
    num_train = int(meta["num_samples"] * meta["train_split"])
    expected = {"train": num_train, "test": meta["num_samples"] - num_train}
    for split, count in expected.items():
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.float32 or x.shape != (count, SEQ_LEN):
            return None, f"x_{split} has dtype {x.dtype} and shape {x.shape}"
        if y.dtype != np.int64 or y.shape != (count,):
            return None, f"y_{split} has dtype {y.dtype} and shape {y.shape}"
        if count and (y.min() < 0 or y.max() >= NUM_CLASSES):
            return None, f"y_{split} has labels outside [0, {NUM_CLASSES})"
        if not np.isfinite(x).all():
            return None, f"x_{split} has non-finite values"
    return arrays, None


def _atomic_save(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        # mkstemp creates the file as 0600; give the cache the usual umask-based permissions so
        # that other users or jobs sharing the data directory can read it.
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_current_umask())
            np.savez(handle, meta=np.array(_meta_json(meta)), **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _current_umask() -> int:
    """Returns the process umask without changing it (thread-safe on Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _generate(meta: dict[str, Any], *, progress: bool) -> dict[str, np.ndarray]:
    """Generates, shuffles, splits and scales the data described by ``meta``."""
    num_samples, seed = meta["num_samples"], meta["seed"]
    x, y = _generate_raw(num_samples=num_samples, seed=seed, progress=progress)
    perm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))).permutation(
        num_samples
    )
    x, y = x[perm], y[perm]
    split_ix = int(num_samples * meta["train_split"])
    x_train, x_test = x[:split_ix], x[split_ix:]
    if meta["scale"] == "standard":
        mean, std = x_train.mean(), x_train.std()
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    elif meta["scale"] == "unit":
        low, high = x_train.min(), x_train.max()
        span = max(float(high - low), 1e-12)
        x_train = np.clip((x_train - low) / span, 0.0, 1.0)
        x_test = np.clip((x_test - low) / span, 0.0, 1.0)
    return {
        "x_train": np.ascontiguousarray(x_train, dtype=np.float32),
        "y_train": np.ascontiguousarray(y[:split_ix], dtype=np.int64),
        "x_test": np.ascontiguousarray(x_test, dtype=np.float32),
        "y_test": np.ascontiguousarray(y[split_ix:], dtype=np.int64),
    }


def _generate_raw(*, num_samples: int, seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Generates unscaled, unshuffled samples; restores the global RNG states afterwards."""
    from mnist1d.data import get_templates
    from mnist1d.transform import transform
    from mnist1d.utils import ObjectView
    from tqdm.auto import tqdm

    templates = get_templates()
    args = ObjectView(dict(_TRANSFORM_ARGS))
    x = np.empty((num_samples, SEQ_LEN), dtype=np.float64)
    y = np.arange(num_samples, dtype=np.int64) % NUM_CLASSES
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with tqdm(
            total=num_samples, desc="Generating MNIST-1D", unit="sample", disable=not progress
        ) as bar:
            for chunk, start in enumerate(range(0, num_samples, CHUNK_SIZE)):
                stop = min(start + CHUNK_SIZE, num_samples)
                chunk_seed = np.random.SeedSequence(seed, spawn_key=(0, chunk))
                np.random.seed(chunk_seed.generate_state(4))
                random.seed(int(chunk_seed.generate_state(1)[0]))
                for i in range(start, stop):
                    x[i], _ = transform(templates["x"][y[i]], templates["t"], args)
                bar.update(stop - start)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return x, y
