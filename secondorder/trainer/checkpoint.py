"""Checkpoints: atomic writes, the newest N kept, safe loading, exact resume.

A checkpoint is one ``torch.save`` file under ``<run_dir>/checkpoints/step_XXXXXXXX.pt``. It is
written to a temporary name in the same directory and renamed into place, so a crash never
leaves a half-written file under a checkpoint name; a failed write removes its temporary file
(on a full disk it would keep the disk full). Loading uses ``weights_only=True``: only tensors
and plain containers are read back, never arbitrary pickled objects. ``resume=auto`` falls back
to the newest readable checkpoint when a newer one is damaged.
"""

from __future__ import annotations

import errno
import inspect
import os
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from secondorder.data import DATASETS
from secondorder.models import MODELS

# 2: optimizers keep the damping λ in ``param_groups`` and their counters in ``global_state``.
FORMAT_VERSION = 2
_NAME = re.compile(r"^step_(\d{8})\.pt$")


# Data options that say where the data lives or how loading reports, not which samples it holds.
DATA_LOCATION_KEYS = frozenset({"root", "progress", "max_bad_fraction"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (unreadable, truncated, from another run setup) or
    cannot be written."""


class DiskFullError(CheckpointError):
    """The run directory's file system has no room for a checkpoint or a record."""


def capture_rng() -> dict[str, Any]:
    """Every RNG the process uses, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``run_dir``, oldest first (temporary files are ignored)."""
    return _checkpoints_in(checkpoint_dir(run_dir))


def _checkpoints_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


# -- writing -------------------------------------------------------------------------------------


def write_atomic(
    path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, size_hint: int
) -> None:
    """Write ``path`` through a temporary file in its directory, synced, then renamed in place.

    A failed write removes the temporary file, so a full disk is not kept full by it. Python's
    own file object is used (not a path handed to C++), so a full disk surfaces as ``ENOSPC``.

    Args:
        path: the final file.
        write: writes the content to the open binary file.
        size_hint: about how many bytes the content takes (for the full-disk message).

    Raises:
        DiskFullError: the file system ran out of space or quota.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, size_hint, err) from err
        raise


def disk_full(path: Path, size_hint: int, err: OSError) -> DiskFullError:
    """The full-disk error a user can act on: which file system, how much room was needed."""
    folder = path.parent
    try:
        stats = os.statvfs(folder)
        free = f"{stats.f_bavail * stats.f_frsize:,} bytes free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"{err.strerror or os.strerror(err.errno)} writing {path}: it needs about "
        f"{size_hint:,} bytes, the file system of {folder} ({_device_of(folder)}) has {free}; "
        "free space or choose another trainer.run_dir, then resume with trainer.resume=auto"
    )


def _device_of(folder: Path) -> str:
    """``device <source> mounted at <mount point>``, from ``/proc/mounts`` where it exists."""
    mount = folder.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    source = "unknown device"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == str(mount):
                source = fields[0]  # the last entry for a mount point is the visible one
    except OSError:
        pass
    return f"device {source} mounted at {mount}"


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested payload: what a ``torch.save`` of it mostly writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_torch_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`write_atomic`."""
    write_atomic(path, lambda f: torch.save(obj, f), size_hint=tensor_bytes(obj) + 4096)


def save_checkpoint(
    payload: dict[str, Any], *, run_dir: str | os.PathLike, step: int, keep: int
) -> Path:
    """Write ``payload`` atomically as the checkpoint of ``step`` and prune to ``keep`` files."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    _remove_orphans(folder)
    save_torch_atomic(final, {"format": FORMAT_VERSION, **payload})
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def _remove_orphans(folder: Path) -> None:
    """Delete temporary files of writers that are gone (killed mid-write): on a full disk
    they would keep it full. A live process's file is left alone."""
    for tmp in folder.glob(".tmp-*"):
        pid = tmp.name.split("-")[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            continue


# -- what a checkpoint belongs to ----------------------------------------------------------------


def fingerprint(
    *,
    model: str,
    model_options: dict[str, Any],
    data: str,
    data_options: dict[str, Any],
    train_samples: int,
    seed: int,
) -> dict[str, Any]:
    """The architecture and data identity a checkpoint is only valid for, keyed by config key.

    The model's options (defaults filled in) shape its state; the data options that change the
    samples (all but :data:`DATA_LOCATION_KEYS`), the number of training samples and the seed
    fix the sample order a resume continues. A resume that changes one of them would go on
    silently with other data, so it is refused with the key that differs.
    """
    found = {f"model.{k}": _plain(v) for k, v in _with_defaults(MODELS.get(model), model_options)}
    found.update(
        {
            f"data.{k}": _plain(v)
            for k, v in _with_defaults(DATASETS.get(data), data_options)
            if k not in DATA_LOCATION_KEYS
        }
    )
    found["training samples"] = int(train_samples)
    found["trainer.seed"] = int(seed)
    return found


def _with_defaults(factory: Callable[..., Any] | None, given: dict[str, Any]) -> list:
    """``given`` completed by the factory's keyword defaults, sorted by name: a default written
    out in the config and one left out are the same setup."""
    options = {}
    if factory is not None:
        for p in inspect.signature(factory).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty:
                options[p.name] = p.default
    options.update(given)
    return sorted(options.items())


def _plain(value: Any) -> Any:
    """A value ``weights_only`` loading reads back equal: numbers, strings, lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


# -- reading -------------------------------------------------------------------------------------


class UnreadableCheckpoint(CheckpointError):
    """The file is not a loadable checkpoint: empty, truncated, or not a ``torch.save`` file."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load ``path`` with ``weights_only`` and check its format.

    Raises:
        UnreadableCheckpoint: empty, truncated or foreign file.
        CheckpointError: written by another checkpoint format.
    """
    if os.path.getsize(path) == 0:
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: empty file (0 bytes)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure here means "unusable file"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: {reason}") from err
    if not isinstance(payload, dict) or "format" not in payload:
        raise UnreadableCheckpoint(
            f"{path} is not a secondorder checkpoint (format {FORMAT_VERSION})"
        )
    if payload["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} was written by another version of secondorder (checkpoint "
            f"format {payload['format']!r}, this version reads {FORMAT_VERSION}); resume it with "
            "the version that wrote it, or start a new run"
        )
    return payload


def check_setup(path: str | os.PathLike, payload: dict[str, Any], expect: dict[str, Any]) -> None:
    """Refuse a checkpoint whose ``meta`` differs from ``expect``, naming each differing key.

    A dict in ``expect`` (the :func:`fingerprint`) is compared key by key; a checkpoint that
    has none (written before fingerprints were recorded) is checked on the other fields only.
    """
    meta = payload.get("meta", {})
    wrong = []
    for key, want in expect.items():
        have = meta.get(key)
        if isinstance(want, dict):
            if isinstance(have, dict):
                wrong += [(k, have.get(k), v) for k, v in want.items() if have.get(k) != v]
                wrong += [(k, v, None) for k, v in have.items() if k not in want]
        elif have != want:
            wrong.append((key, have, want))
    if wrong:
        details = ", ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, a, b in wrong)
        raise CheckpointError(f"checkpoint {path} was written by a different setup ({details})")


def load_checkpoint(path: str | os.PathLike, *, expect: dict[str, Any]) -> dict[str, Any]:
    """Load ``path`` safely and check it belongs to this setup.

    Args:
        path: the checkpoint file.
        expect: identity fields (model, optimizer, world size, the :func:`fingerprint`, ...)
            that must match the checkpoint's ``meta``.

    Raises:
        CheckpointError: unreadable or truncated file, unknown format, or a mismatch. An
            unreadable file's message names an older intact checkpoint beside it, if any.
    """
    try:
        payload = read_checkpoint(path)
    except UnreadableCheckpoint as err:
        path = Path(path)
        beside = [p for p in _checkpoints_in(path.parent) if p != path]
        if _NAME.match(path.name):
            beside = [p for p in beside if p.name < path.name]
        intact = _newest_readable(beside)
        if intact is None:
            raise
        raise UnreadableCheckpoint(
            f"{err}; an intact older checkpoint exists: {intact[0]} "
            f"(resume from it with trainer.resume={intact[0]})"
        ) from err
    check_setup(path, payload, expect)
    return payload


def _newest_readable(paths: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    for path in reversed(paths):
        try:
            return path, read_checkpoint(path)
        except UnreadableCheckpoint:
            continue
    return None


def find_resume(
    resume: str | None, run_dir: str | os.PathLike, *, expect: dict[str, Any]
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``trainer.resume`` points to, loaded and checked against ``expect``.

    ``auto`` takes the newest checkpoint in ``run_dir`` that can be read (none: a fresh start);
    a damaged newer one (a kill or a full disk during its write) is skipped with a warning
    naming it and the one used. A readable checkpoint of another setup is refused, never
    skipped: it says the run's options changed, not that a file was damaged.

    Raises:
        CheckpointError: no such file, every checkpoint unreadable, or a setup mismatch.
    """
    if resume is None:
        return None
    if resume != "auto":
        if not Path(resume).is_file():
            raise CheckpointError(f"trainer.resume={resume!r}: no such checkpoint file")
        return Path(resume), load_checkpoint(resume, expect=expect)
    found = list_checkpoints(run_dir)
    damaged: list[str] = []
    for path in reversed(found):
        try:
            payload = read_checkpoint(path)
        except UnreadableCheckpoint as err:
            damaged.append(str(err))
            continue
        check_setup(path, payload, expect)
        if damaged:
            warnings.warn(
                f"skipped damaged checkpoints ({'; '.join(damaged)}); resuming from {path}",
                stacklevel=2,
            )
        return path, payload
    if damaged:
        raise CheckpointError(
            f"trainer.resume=auto: no checkpoint in {checkpoint_dir(run_dir)} can be read "
            f"({'; '.join(damaged)}); resume from another file or start a new run_dir"
        )
    return None


def restore_state(path: str | os.PathLike, what: str, target: Any, state: Any) -> None:
    """``target.load_state_dict(state)``, a mismatch reported as :class:`CheckpointError`.

    A checkpoint of the same model and optimizer names can still hold other shapes or keys
    (the architecture's options changed, say ``model.hidden``).
    """
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path}: its {what} state does not fit this run ({reason}); was it "
            "written with other model or optimizer options?"
        ) from err
