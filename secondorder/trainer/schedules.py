"""Learning-rate schedules as pure functions of the step.

A schedule returns the multiplier applied to each parameter group's base learning rate at a
step; being stateless, it resumes from a checkpoint by the step number alone. Published recipes
state warm-up and decay points in epochs (Goyal et al. 2017: 5 warm-up epochs, steps at 30, 60
and 80); :func:`schedule_in_steps` turns those into steps once the epoch length is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

ScheduleName = Literal["constant", "cosine", "polynomial", "step"]


@dataclass
class ScheduleSettings:
    """Linear warm-up, then a decay.

    Attributes:
        name: ``constant``, ``cosine`` (to ``min_lr_ratio``), ``polynomial`` (power ``power``
            to ``min_lr_ratio``) or ``step`` (multiply by ``gamma`` at each of ``milestones``).
        warmup_steps: linear ramp from ``1/warmup_steps`` to 1 over the first steps.
        min_lr_ratio: the final multiplier of the cosine and polynomial decays.
        power: exponent of the polynomial decay (1 is linear).
        gamma: factor of the step decay.
        milestones: steps at which the step decay applies ``gamma``.
        warmup_epochs: the warm-up in epochs (instead of ``warmup_steps``).
        milestone_epochs: epochs at which the step decay applies ``gamma`` (with ``milestones``).
    """

    name: ScheduleName = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    power: float = 1.0
    gamma: float = 0.1
    milestones: list[int] = field(default_factory=list)
    warmup_epochs: float = 0.0
    milestone_epochs: list[float] = field(default_factory=list)


def schedule_in_steps(settings: ScheduleSettings, *, steps_per_epoch: int) -> ScheduleSettings:
    """``settings`` with its epoch-valued points converted to (rounded) steps."""
    if not settings.warmup_epochs and not settings.milestone_epochs:
        return settings
    warmup = settings.warmup_steps
    if settings.warmup_epochs:
        warmup = max(1, round(settings.warmup_epochs * steps_per_epoch))
    milestones = [*settings.milestones]
    milestones += [round(e * steps_per_epoch) for e in settings.milestone_epochs]
    return replace(
        settings,
        warmup_steps=warmup,
        milestones=sorted(milestones),
        warmup_epochs=0.0,
        milestone_epochs=[],
    )


def make_schedule(settings: ScheduleSettings, *, total_steps: int) -> Callable[[int], float]:
    """The multiplier ``f(step)`` for 0-based ``step`` in a run of ``total_steps`` steps."""
    warmup = settings.warmup_steps
    floor = settings.min_lr_ratio
    decay_steps = max(1, total_steps - warmup)

    def decay(step: int) -> float:
        progress = min(1.0, max(0, step - warmup) / decay_steps)
        if settings.name == "constant":
            return 1.0
        if settings.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if settings.name == "polynomial":
            return floor + (1 - floor) * (1 - progress) ** settings.power
        return settings.gamma ** sum(step >= m for m in settings.milestones)

    def schedule(step: int) -> float:
        ramp = (step + 1) / warmup if step < warmup else 1.0
        return ramp * decay(step)

    return schedule


def scaled_lr(lr: float, *, batch_size: int, base_batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``lr * batch / base_batch``."""
    return lr * batch_size / base_batch_size
