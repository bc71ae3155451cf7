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


def test_epoch_points_become_steps() -> None:
    from secondorder.trainer.schedules import schedule_in_steps

    settings = ScheduleSettings(
        name="step", warmup_epochs=1.5, milestone_epochs=[3, 2.5], milestones=[1]
    )
    steps = schedule_in_steps(settings, steps_per_epoch=10)
    assert steps.warmup_steps == 15 and steps.milestones == [1, 25, 30]
    assert steps.warmup_epochs == 0.0 and steps.milestone_epochs == []
    f = make_schedule(steps, total_steps=40)
    assert [f(s) for s in (0, 14, 15, 24, 25, 30)] == pytest.approx(
        [1 / 15, 0.1, 0.1, 0.1, 0.01, 0.001]
    )
    plain = ScheduleSettings(warmup_steps=3)
    assert schedule_in_steps(plain, steps_per_epoch=10) is plain


def test_max_epochs_sets_the_steps_of_the_run() -> None:
    from secondorder.trainer.settings import TrainerSettings, in_steps

    settings = TrainerSettings(max_epochs=2.5, lr_schedule=ScheduleSettings(warmup_epochs=1))
    resolved = in_steps(settings, steps_per_epoch=7)
    assert resolved.max_steps == 18 and resolved.max_epochs is None  # ceil(17.5)
    assert resolved.lr_schedule.warmup_steps == 7
    assert in_steps(TrainerSettings(max_steps=5), steps_per_epoch=7).max_steps == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_epochs=0"], "trainer.max_epochs: must be positive or null"),
        (
            ["trainer.lr_schedule.warmup_epochs=2", "trainer.lr_schedule.warmup_steps=3"],
            "trainer.lr_schedule.warmup_epochs: set the warm-up in epochs or in steps",
        ),
    ],
)
def test_epoch_settings_are_validated(overrides: list[str], message: str) -> None:
    from conftest import compose_config

    from secondorder.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))
