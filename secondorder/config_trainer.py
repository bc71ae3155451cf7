"""Validation of the ``trainer`` group and of the step options that depend on other groups.

Split from :mod:`secondorder.config` (which composes the whole run) to keep each module short;
:func:`secondorder.config.validate` calls both functions.
"""

from __future__ import annotations

from typing import Any

from secondorder.config_values import ConfigError, dataclass_from
from secondorder.data.sampler import plan_batches
from secondorder.optim import OPTIMIZERS
from secondorder.trainer.noise_scale import small_batch_source
from secondorder.trainer.settings import COMPILE_REFUSED, TrainerSettings

__all__ = ["check_step_options", "trainer_settings"]


def trainer_settings(data: Any, task: str, batch_size: int, world_size: int) -> TrainerSettings:
    """The ``trainer`` group, checked, including what depends on the task and batch plan."""
    trainer = dataclass_from(TrainerSettings, data, "trainer")
    _check_trainer(trainer)
    metric = trainer.target.metric
    produced = ["train_loss", "eval_loss"] + (["eval_accuracy"] if task == "classification" else [])
    if metric is not None and metric not in produced:
        raise ConfigError(
            f"trainer.target.metric: {metric!r} is not produced by a {task} task; "
            f"allowed values: {', '.join(produced)}"
        )
    if (metric is None) != (trainer.target.value is None):
        raise ConfigError("trainer.target: set both metric and value, or neither")
    try:
        plan = plan_batches(
            global_batch=batch_size, world_size=world_size, max_micro_batch=trainer.max_micro_batch
        )
    except ValueError as err:
        raise ConfigError(f"data.batch_size: {err}") from err
    if trainer.noise_scale_every and not small_batch_source(
        world_size=world_size, accumulation_steps=plan.accumulation_steps
    ):
        raise ConfigError(
            "trainer.noise_scale_every: the noise scale compares gradients of two batch sizes, "
            f"but one process takes the whole batch of {batch_size} in one micro-batch; run on "
            "more ranks or set trainer.max_micro_batch below the batch"
        )
    return trainer


def check_step_options(
    trainer: TrainerSettings,
    *,
    model: str,
    loss: str,
    sync_bn: bool,
    optimizer: str,
    backend: str,
) -> None:
    """Options of the training step that depend on the model, the optimizer or the backend."""
    smoothing = trainer.label_smoothing
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"trainer.label_smoothing: must be in [0, 1), got {smoothing}")
    if smoothing and loss != "cross_entropy":
        raise ConfigError(
            f"trainer.label_smoothing: needs the cross_entropy loss, model {model} has "
            f"loss {loss!r}; set trainer.label_smoothing=0"
        )
    if trainer.compile and optimizer in COMPILE_REFUSED:
        raise ConfigError(
            f"trainer.compile=true: not supported with optimizer {optimizer!r}: "
            f"{COMPILE_REFUSED[optimizer]}; supported: "
            f"{', '.join(sorted(set(OPTIMIZERS) - set(COMPILE_REFUSED)))}"
        )
    if sync_bn and backend in ("horovod", "none"):
        raise ConfigError(
            f"model.sync_bn: SyncBatchNorm needs the torch.distributed backend, got "
            f"distributed={backend}; use distributed=torch (torchrun) or model.sync_bn=false"
        )


def _check_trainer(t: TrainerSettings) -> None:
    positive = {
        "trainer.max_steps": t.max_steps,
        "trainer.max_micro_batch": t.max_micro_batch,
        "trainer.log_every": t.log_every,
        "trainer.base_batch_size": t.base_batch_size,
    }
    non_negative = {
        "trainer.eval_every": t.eval_every,
        "trainer.checkpoint_every": t.checkpoint_every,
        "trainer.keep_checkpoints": t.keep_checkpoints,
        "trainer.lr_schedule.warmup_steps": t.lr_schedule.warmup_steps,
        "trainer.noise_scale_every": t.noise_scale_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be zero or positive, got {value}")
    if t.max_epochs is not None and t.max_epochs <= 0:
        raise ConfigError(f"trainer.max_epochs: must be positive or null, got {t.max_epochs}")
    schedule = t.lr_schedule
    if schedule.warmup_epochs < 0:
        raise ConfigError(
            f"trainer.lr_schedule.warmup_epochs: must be zero or positive, got "
            f"{schedule.warmup_epochs}"
        )
    if schedule.warmup_epochs and schedule.warmup_steps:
        raise ConfigError(
            "trainer.lr_schedule.warmup_epochs: set the warm-up in epochs or in steps "
            "(warmup_steps), not both"
        )
    if not 0.0 <= t.noise_scale_smoothing < 1.0:
        raise ConfigError(
            f"trainer.noise_scale_smoothing: must be in [0, 1), got {t.noise_scale_smoothing}"
        )
    if t.threads is not None and t.threads <= 0:
        raise ConfigError(f"trainer.threads: must be positive or null, got {t.threads}")
