"""Checkpoints: atomic writes, the newest N kept, safe loading, exact resume.

A checkpoint is one ``torch.save`` file under ``<run_dir>/checkpoints/step_XXXXXXXX.pt``. It is
written to a temporary name in the same directory and renamed into place, so a crash never
leaves a half-written file under a checkpoint name. Loading uses ``weights_only=True``: only
tensors and plain containers are read back, never arbitrary pickled objects.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

# 2: optimizers keep the damping λ in ``param_groups`` and their counters in ``global_state``.
FORMAT_VERSION = 2
_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, or from another run setup."""


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
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def save_checkpoint(
    payload: dict[str, Any], *, run_dir: str | os.PathLike, step: int, keep: int
) -> Path:
    """Write ``payload`` atomically as the checkpoint of ``step`` and prune to ``keep`` files."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    tmp = folder / f".tmp-{os.getpid()}-{final.name}"
    torch.save({"format": FORMAT_VERSION, **payload}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """The file ``trainer.resume`` points to: ``auto`` = newest in ``run_dir`` (or none)."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"trainer.resume={resume!r}: no such checkpoint file")
    return path


def load_checkpoint(path: str | os.PathLike, *, expect: dict[str, Any]) -> dict[str, Any]:
    """Load ``path`` safely and check it belongs to this setup.

    Args:
        path: the checkpoint file.
        expect: identity fields (model, optimizer, world size, ...) that must match the
            checkpoint's ``meta``.

    Raises:
        CheckpointError: unreadable or truncated file, unknown format, or a mismatch.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure here means "unusable file"
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{path} is not a secondorder checkpoint (format {FORMAT_VERSION})")
    if payload["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} was written by another version of secondorder (checkpoint "
            f"format {payload['format']!r}, this version reads {FORMAT_VERSION}); resume it with "
            "the version that wrote it, or start a new run"
        )
    meta = payload.get("meta", {})
    wrong = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
    if wrong:
        details = ", ".join(
            f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in wrong.items()
        )
        raise CheckpointError(f"checkpoint {path} was written by a different setup ({details})")
    return payload


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
