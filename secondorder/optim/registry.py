"""The optimizers by config name; each class's keyword-only signature is its schema.

:data:`OPTIMIZERS` maps a config name to an :class:`OptimizerEntry`: the class and, only where a
config key is not one of its arguments, a thin translation. :func:`hyperparameters` lists one
entry's config keys with their annotations and defaults, read from the class signature, so the
defaults are written once, in the class. :func:`build_optimizer` passes the context arguments
(``model``, ``loss_kind``, ``comm``, ``steps_per_epoch``) only to a class whose signature takes
them.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from secondorder.optim.baselines import SGD, AdamW
from secondorder.optim.context import OptimContext
from secondorder.optim.curveball import CurveBall
from secondorder.optim.kfac import KFAC
from secondorder.optim.lamb import LAMB
from secondorder.optim.lars import LARS
from secondorder.optim.library_optimizers import SOAP, Muon, Shampoo
from secondorder.optim.neumann import Neumann
from secondorder.optim.newton import ExactNewton
from secondorder.optim.newton_cg import GaussNewtonCG, NewtonCG

__all__ = [
    "CONTEXT_ARGUMENTS",
    "OPTIMIZERS",
    "REQUIRED",
    "Hyperparameter",
    "OptimizerEntry",
    "build_optimizer",
    "hyperparameters",
]

CONTEXT_ARGUMENTS = ("model", "loss_kind", "comm", "steps_per_epoch")
REQUIRED = inspect.Parameter.empty


class Hyperparameter(NamedTuple):
    """One config key: its annotation and default (:data:`REQUIRED` when there is none)."""

    annotation: Any
    default: Any


@dataclass(frozen=True)
class OptimizerEntry:
    """What one config name builds.

    Attributes:
        cls: the optimizer class; its keyword-only arguments, less the context ones, are the
            config keys.
        pairs: class arguments that are a pair, each given as two config keys (Adam's ``betas``
            as ``beta1`` and ``beta2``), so that each is one command-line override.
        translate: ``translate(context, **keys) -> class arguments`` for config keys stated in
            other units than the class's; its keyword-only arguments are config keys too.
        hidden: class arguments that are not config keys (made by ``translate``, or unused).
    """

    cls: type[torch.optim.Optimizer]
    pairs: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    translate: Callable[..., dict[str, Any]] | None = None
    hidden: tuple[str, ...] = ()


def neumann_periods(
    context: OptimContext,
    *,
    warmup_epochs: float = 5.0,
    warmup_steps: int | None = None,
    reset_epochs: float = 10.0,
    reset_steps: int | None = None,
) -> dict[str, int]:
    """Neumann's warm-up and reset periods, given in epochs (Krishnan et al. 2018, Table 1).

    The class counts steps; epochs become steps through ``context.steps_per_epoch``.
    ``warmup_steps`` / ``reset_steps``, when set, win over the epochs.
    """
    if warmup_epochs < 0:
        raise ValueError(f"Invalid warmup_epochs value: {warmup_epochs}")
    if reset_epochs <= 0:
        raise ValueError(f"Invalid reset_epochs value: {reset_epochs}")
    steps_per_epoch = int(context.steps_per_epoch)
    if warmup_steps is None:
        warmup_steps = round(warmup_epochs * steps_per_epoch)
    if reset_steps is None:
        reset_steps = max(1, round(reset_epochs * steps_per_epoch))
    return {"warmup_steps": warmup_steps, "reset_steps": reset_steps}


_BETAS = {"betas": ("beta1", "beta2")}

OPTIMIZERS: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(SGD),
    "adamw": OptimizerEntry(AdamW, pairs=_BETAS),
    "lars": OptimizerEntry(LARS),
    "lamb": OptimizerEntry(LAMB, pairs=_BETAS),
    "neumann": OptimizerEntry(
        Neumann, translate=neumann_periods, hidden=("warmup_steps", "reset_steps")
    ),
    "curveball": OptimizerEntry(CurveBall),
    "kfac": OptimizerEntry(KFAC),
    "newton": OptimizerEntry(ExactNewton),
    "newton_cg": OptimizerEntry(NewtonCG),
    "ggn_cg": OptimizerEntry(GaussNewtonCG, hidden=("hvp_mode",)),
    # From the pytorch-optimizer package (the `baselines` extra): see library_optimizers.py.
    "shampoo": OptimizerEntry(Shampoo),
    "soap": OptimizerEntry(SOAP, pairs=_BETAS),
    "muon": OptimizerEntry(Muon, pairs={"adamw_betas": ("adamw_beta1", "adamw_beta2")}),
}


def _keyword_only(function: Callable[..., Any]) -> dict[str, Hyperparameter]:
    """The keyword-only arguments of a function or class: name -> (annotation, default)."""
    hints = typing.get_type_hints(function.__init__ if isinstance(function, type) else function)
    return {
        p.name: Hyperparameter(hints.get(p.name, Any), p.default)
        for p in inspect.signature(function).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def hyperparameters(name: str) -> dict[str, Hyperparameter]:
    """The config keys of optimizer ``name``, in signature order."""
    entry = _entry(name)
    keys: dict[str, Hyperparameter] = {}
    for key, (annotation, default) in _keyword_only(entry.cls).items():
        if key in CONTEXT_ARGUMENTS or key in entry.hidden:
            continue
        if key in entry.pairs:
            assert default is not REQUIRED, f"{entry.cls.__name__}.{key}: a pair needs a default"
            types = typing.get_args(annotation)
            for i, part in enumerate(entry.pairs[key]):
                keys[part] = Hyperparameter(types[i], default[i])
        else:
            keys[key] = Hyperparameter(annotation, default)
    if entry.translate is not None:
        keys.update(_keyword_only(entry.translate))
    return keys


def build_optimizer(
    name: str, params: Iterable[torch.Tensor], context: OptimContext, **hyper: Any
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` with hyperparameters ``hyper`` (config keys).

    Raises:
        ValueError: an unknown name, or a hyperparameter the class rejects.
        TypeError: a key that is not a hyperparameter of ``name``.
    """
    entry = _entry(name)
    unknown = sorted(set(hyper) - set(hyperparameters(name)))
    if unknown:
        raise TypeError(f"{name} got unexpected hyperparameters: {', '.join(unknown)}")
    kwargs = dict(hyper)
    signature = inspect.signature(entry.cls).parameters
    for key, parts in entry.pairs.items():
        if any(part in kwargs for part in parts):
            default = signature[key].default
            kwargs[key] = tuple(kwargs.pop(part, default[i]) for i, part in enumerate(parts))
    if entry.translate is not None:
        own = _keyword_only(entry.translate)
        kwargs.update(entry.translate(context, **{k: kwargs.pop(k) for k in own if k in kwargs}))
    for key in CONTEXT_ARGUMENTS:
        if key in signature:
            kwargs[key] = getattr(context, key)
    return entry.cls(params, **kwargs)


def _entry(name: str) -> OptimizerEntry:
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]
