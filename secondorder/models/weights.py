"""Starting weights from a file: a plain ``state_dict`` such as torchvision's ResNet-50.

The parameter and buffer names of :func:`~secondorder.models.resnet.resnet50` are torchvision's,
so its published ImageNet weights load as they are. Loading is strict: every key of the model
must be in the file with its shape, and the file may hold nothing else, so a file for another
network fails before any training with the first differences named. BatchNorm's
``num_batches_tracked`` may be absent, as in files written by older torch versions (BatchNorm
itself accepts that).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["WeightsError", "load_weights"]

_SHOWN = 3  # differences named per kind in a message


class WeightsError(ValueError):
    """A weights file that does not fit the model (or cannot be read); the message says why."""


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the ``state_dict`` stored at ``path`` into ``model`` (strict; see the module).

    Raises:
        WeightsError: the file is missing or unreadable, or its keys or shapes differ.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no such file: {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"{str(path)!r} is not a readable torch state_dict: {err}") from err
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WeightsError(f"{str(path)!r} holds no state_dict (a mapping of names to tensors)")
    problems = state_dict_differences(model.state_dict(), state)
    if problems:
        raise WeightsError(f"{str(path)!r} does not fit the model: {'; '.join(problems)}")
    with torch.no_grad():
        for key, target in model.state_dict().items():
            if key in state:
                target.copy_(state[key])


def state_dict_differences(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, the first few of each in words."""
    missing = [k for k in expected if k not in given and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} (file {list(given[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    return [
        f"{label} {_first(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", shapes),
        )
        if items
    ]


def _first(items: list[str]) -> str:
    more = len(items) - _SHOWN
    return ", ".join(items[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
