"""Typed settings of the training loop (the ``trainer`` config group's schema)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from secondorder.distributed.communicator import BUCKET_MB
from secondorder.trainer.schedules import ScheduleSettings

Metric = Literal["eval_accuracy", "eval_loss", "train_loss"]
Precision = Literal["32", "bf16", "fp16"]


@dataclass
class TargetSettings:
    """Stop when ``metric`` reaches ``value`` (a loss at or below, an accuracy at or above)."""

    metric: Metric | None = None
    value: float | None = None


@dataclass
class TrainerSettings:
    """The loop's knobs.

    Attributes:
        max_steps: optimizer steps (each consumes one global batch).
        eval_every: evaluate (and test the target) every this many steps; 0 = only at the end.
        log_every: write a ``metrics.jsonl`` record every this many steps.
        max_micro_batch: the largest per-rank forward/backward; larger shares accumulate.
        seed: seeds parameters, data order and every RNG.
        device: ``auto`` = CUDA (one GPU per local rank) when present, else CPU.
        precision: ``32``, ``bf16`` (autocast) or ``fp16`` (autocast + loss scaling).
        target: the early-stop target.
        checkpoint_every: write a checkpoint every this many steps (0 = never; one is written
            at the end of a run whenever this is positive).
        keep_checkpoints: how many of the newest checkpoints to keep.
        resume: ``null``, ``auto`` (newest checkpoint in ``run_dir`` if any) or a file path.
        run_dir: where outputs go; ``null`` = a new ``runs/<time>-<model>-<optimizer>`` dir.
        lr_schedule: warm-up and decay of the learning rate.
        scale_lr: apply the linear scaling rule ``lr * batch_size / base_batch_size``.
        base_batch_size: the batch at which ``optimizer.lr`` was tuned.
        progress: a tqdm bar on rank 0.
        threads: ``torch.set_num_threads`` per process (``null`` keeps torch's default).
        grad_bucket_mb: size of the flat buckets of the gradient all-reduce.
        noise_scale_every: measure the gradient noise scale every this many steps and log it
            (``noise_scale``, ``noise_scale_grad_sq``, ``noise_scale_trace``) at log steps;
            0 = off. Needs more than one rank or gradient accumulation.
        noise_scale_smoothing: decay of the noise scale's moving averages, per measurement.
    """

    max_steps: int = 1000
    eval_every: int = 100
    log_every: int = 10
    max_micro_batch: int = 4096
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "32"
    target: TargetSettings = field(default_factory=TargetSettings)
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: str | None = None
    run_dir: str | None = None
    lr_schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    scale_lr: bool = False
    base_batch_size: int = 256
    progress: bool = True
    threads: int | None = None
    grad_bucket_mb: float = BUCKET_MB
    noise_scale_every: int = 0
    noise_scale_smoothing: float = 0.9
