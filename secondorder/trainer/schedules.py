"""Learning-rate schedules as pure functions of the step.

A schedule returns the multiplier applied to each parameter group's base learning rate at a
step; being stateless, it resumes from a checkpoint by the step number alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
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
    """

    name: ScheduleName = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    power: float = 1.0
    gamma: float = 0.1
    milestones: list[int] = field(default_factory=list)


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
