"""Typed settings of the training loop (the ``trainer`` config group's schema)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from secondorder.distributed.communicator import BUCKET_MB
from secondorder.trainer.schedules import ScheduleSettings, schedule_in_steps

Metric = Literal["eval_accuracy", "eval_loss", "train_loss"]
Precision = Literal["auto", "32", "bf16", "fp16"]


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
        max_epochs: the run's length in epochs instead (``null``: ``max_steps`` counts).
        eval_every: evaluate (and test the target) every this many steps; 0 = only at the end.
        log_every: write a ``metrics.jsonl`` record every this many steps.
        max_micro_batch: the largest per-rank forward/backward; larger shares accumulate.
        seed: seeds parameters, data order and every RNG.
        device: ``auto`` = CUDA (one GPU per local rank) when present, else CPU.
        precision: ``auto`` (``bf16`` on a CUDA device that supports it, else ``32``), ``32``,
            ``bf16`` (autocast) or ``fp16`` (autocast + loss scaling).
        cudnn_benchmark: on CUDA, let cuDNN pick the fastest kernels per input shape (turn off
            for bitwise-reproducible GPU runs).
        compile: wrap the model's forward in ``torch.compile`` (optimizers that only need the
            loss and gradients; see :data:`COMPILE_REFUSED`).
        label_smoothing: ``ε`` of the cross-entropy training loss, in ``[0, 1)``.
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
    max_epochs: float | None = None
    eval_every: int = 100
    log_every: int = 10
    max_micro_batch: int = 4096
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "auto"
    cudnn_benchmark: bool = True
    compile: bool = False
    label_smoothing: float = 0.0
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


#: Optimizers that refuse ``trainer.compile=true``, and why: each reads more than the loss and
#: the gradients the compiled forward gives.
COMPILE_REFUSED: dict[str, str] = {
    "kfac": "K-FAC's layer hooks must see the real module inputs and output gradients",
    "newton": "exact Newton differentiates the model functionally (torch.func) twice",
    "newton_cg": "Hessian-vector products differentiate the model functionally twice",
    "ggn_cg": "Gauss-Newton-vector products run the model functionally (torch.func)",
    "curveball": "its curvature products run the model functionally (torch.func)",
}


def in_steps(settings: TrainerSettings, *, steps_per_epoch: int) -> TrainerSettings:
    """``settings`` with every length given in epochs (``max_epochs``, the schedule's
    ``warmup_epochs`` and ``milestone_epochs``) turned into steps of this run's epoch."""
    max_steps = settings.max_steps
    if settings.max_epochs is not None:
        max_steps = max(1, math.ceil(settings.max_epochs * steps_per_epoch))
    schedule = schedule_in_steps(settings.lr_schedule, steps_per_epoch=steps_per_epoch)
    return replace(settings, max_steps=max_steps, max_epochs=None, lr_schedule=schedule)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: ``auto`` becomes ``bf16`` on a CUDA device with bfloat16
    support and ``32`` everywhere else (CPU autocast in bfloat16 is slower than float32)."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "32"
