"""Run an optimizer class's own range checks on a run's hyperparameters before any work.

The classes validate their arguments in ``__init__`` (the message names the bad value, as in
``torch.optim``). :func:`check_hyperparameters` constructs the class once on a 2x2 linear layer,
so a config mistake surfaces before data or model are built, and names the config key the
message is about.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secondorder.optim.context import OptimContext
from secondorder.optim.registry import build_optimizer, hyperparameters

__all__ = ["HyperparameterError", "check_hyperparameters", "key_in_message"]

# Phrases of the classes' messages that stand for a config key.
_MESSAGE_KEYS = {
    "learning rate": "lr",
    "epsilon": "eps",
    "beta parameter at index 0": "beta1",
    "beta parameter at index 1": "beta2",
    "momentum range": "mu_min",
    "lambda thresholds": "lambda_low",
}


class HyperparameterError(ValueError):
    """A hyperparameter the optimizer class rejects; ``key``: the config key (``None``: unknown)."""

    def __init__(self, message: str, key: str | None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class _ProbeComm:
    """Stands for the run's communicator during the probe: only its size is read."""

    world_size: int
    rank: int = 0
    is_main: bool = True


def key_in_message(message: str, keys: list[str]) -> str | None:
    """The key a class's ``ValueError`` is about: the first of ``keys`` its message names."""
    found = []
    for phrase, key in [*((k, k) for k in keys), *_MESSAGE_KEYS.items()]:
        match = re.search(rf"(?<![\w.]){re.escape(phrase)}(?!\w)", message, flags=re.IGNORECASE)
        if match and key in keys:
            found.append((match.start(), -len(phrase), key))
    return min(found)[2] if found else None


def check_hyperparameters(
    name: str, hyper: Mapping[str, Any], *, loss_kind: str, world_size: int = 1
) -> None:
    """Construct optimizer ``name`` with ``hyper`` on a probe layer; nothing is kept.

    Raises:
        HyperparameterError: the class rejected a value (its message, and the key it names).
    """
    with torch.random.fork_rng(devices=[]):  # the probe's initialisation draws no run's numbers
        probe = nn.Linear(2, 2)
    comm = _ProbeComm(world_size) if world_size > 1 else None
    context = OptimContext(model=probe, loss_kind=loss_kind, comm=comm)
    try:
        build_optimizer(name, probe.parameters(), context, **hyper)
    except ValueError as err:
        key = key_in_message(str(err), [*hyperparameters(name)])
        raise HyperparameterError(str(err), key) from err
