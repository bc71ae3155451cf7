"""Learning-rate schedules against their formulas."""

from __future__ import annotations

import math

import pytest

from secondorder.trainer.schedules import ScheduleSettings, make_schedule, scaled_lr


def test_constant_with_warmup() -> None:
    f = make_schedule(ScheduleSettings(warmup_steps=4), total_steps=10)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine() -> None:
    f = make_schedule(ScheduleSettings(name="cosine", min_lr_ratio=0.1), total_steps=100)
    for step in (0, 25, 50, 99, 100):
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 100))
        assert f(step) == pytest.approx(expected)


def test_polynomial_after_warmup() -> None:
    settings = ScheduleSettings(name="polynomial", warmup_steps=10, power=2.0)
    f = make_schedule(settings, total_steps=110)
    assert f(4) == pytest.approx(0.5 * (1 - 0) ** 2)
    assert f(60) == pytest.approx((1 - 50 / 100) ** 2)
    assert f(110) == pytest.approx(0.0)


def test_step_decay() -> None:
    f = make_schedule(ScheduleSettings(name="step", gamma=0.5, milestones=[10, 20]), total_steps=30)
    assert (f(9), f(10), f(19), f(20), f(29)) == (1.0, 0.5, 0.5, 0.25, 0.25)


def test_linear_scaling_rule() -> None:
    assert scaled_lr(0.1, batch_size=32768, base_batch_size=256) == pytest.approx(12.8)
