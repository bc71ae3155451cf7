"""Constructor validation and update schedules for :class:`~secondorder.optim.kfac.KFAC`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

from secondorder.optim.kfac.sampling import SAMPLED_LOSS_KINDS

__all__ = [
    "INVERSE_METHODS",
    "FisherType",
    "InverseMethod",
    "OtherPreconditioner",
    "Schedule",
    "due",
    "validate_kfac",
]

Schedule = int | Callable[[int], int]
InverseMethod = Literal["eigen", "inverse"]
FisherType = Literal["true", "empirical"]
OtherPreconditioner = Literal["none", "adam"]
INVERSE_METHODS: tuple[str, ...] = get_args(InverseMethod)
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)
OTHER_PRECONDITIONERS: tuple[str, ...] = get_args(OtherPreconditioner)


def due(every: Schedule, step: int, name: str) -> bool:
    """Whether work scheduled ``every`` steps runs at ``step`` (step 0 always does)."""
    interval = every(step) if callable(every) else every
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"Invalid {name} at step {step}: {interval!r} (need an int >= 1)")
    return step % interval == 0


def validate_kfac(args: Mapping[str, Any], world_size: int) -> None:
    """Check the KFAC constructor's arguments; the message names the bad value.

    Raises:
        ValueError: for any out-of-range or unknown value.
    """
    _check_update(args)
    _check_layout(args, world_size)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_update(args: Mapping[str, Any]) -> None:
    """The step's hyperparameters: rates, schedules, curvature kind, damping and clipping."""
    lr, momentum, damping = args["lr"], args["momentum"], args["damping"]
    _check(lr >= 0, f"Invalid learning rate: {lr}")
    _check(0 <= momentum < 1, f"Invalid momentum value: {momentum}")
    _check(damping > 0, f"Invalid damping value: {damping}")
    _check(0 <= args["factor_decay"] < 1, f"Invalid factor_decay value: {args['factor_decay']}")
    for name in ("factor_update_every", "inverse_update_every"):
        value = args[name]
        if not callable(value):
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"Invalid {name} value: {value!r} (an int >= 1 or a callable step -> int)",
            )
    method = args["inverse_method"]
    _check(
        method in INVERSE_METHODS,
        f"Invalid inverse_method value: {method!r}; choose eigen or inverse",
    )
    fisher, kind = args["fisher_type"], args["loss_kind"]
    _check(
        fisher in FISHER_TYPES, f"Invalid fisher_type value: {fisher!r}; choose true or empirical"
    )
    if fisher == "true":
        _check(
            kind in SAMPLED_LOSS_KINDS,
            f"fisher_type='true' cannot sample targets for loss kind {kind!r}; supported: "
            f"{', '.join(SAMPLED_LOSS_KINDS)} (or use fisher_type='empirical')",
        )
    kl_clip = args["kl_clip"]
    _check(kl_clip is None or kl_clip > 0, f"Invalid kl_clip value: {kl_clip} (> 0 or None)")
    _check(args["weight_decay"] >= 0, f"Invalid weight_decay value: {args['weight_decay']}")
    marquardt = args["levenberg_marquardt"]
    _check(isinstance(marquardt, bool), f"Invalid levenberg_marquardt value: {marquardt!r}")
    every = args["damping_adapt_every"]
    _check(isinstance(every, int) and every >= 1, f"Invalid damping_adapt_every value: {every!r}")


def _check_layout(args: Mapping[str, Any], world_size: int) -> None:
    """Which layers K-FAC covers and how its work is split over ranks and buckets."""
    threshold = args["double_factor_threshold"]
    _check(
        isinstance(threshold, int) and threshold >= 1,
        f"Invalid double_factor_threshold value: {threshold!r}",
    )
    exclude = args["exclude"]
    _check(
        not isinstance(exclude, str) and all(isinstance(p, str) for p in exclude),
        f"Invalid exclude value: {exclude!r} (a list of name patterns)",
    )
    other = args["other_preconditioner"]
    _check(
        other in OTHER_PRECONDITIONERS,
        f"Invalid other_preconditioner value: {other!r}; choose none or adam",
    )
    fraction = args["grad_worker_fraction"]
    _check(0 < fraction <= 1, f"Invalid grad_worker_fraction value: {fraction}")
    workers = max(1, round(fraction * world_size))
    _check(
        workers in (1, world_size),
        f"Invalid grad_worker_fraction value: {fraction} gives {workers} gradient workers on "
        f"world size {world_size}; only 1.0 (every rank) and 1/world_size (one rank per "
        "layer) are implemented",
    )
    _check(args["bucket_mb"] > 0, f"Invalid bucket_mb value: {args['bucket_mb']}")
