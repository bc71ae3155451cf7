"""The training loop: one loop for every optimizer.

Each step hands this rank's micro-batches to a :class:`~secondorder.optim.closure.BatchClosure`
and calls ``loss = optimizer.step(closure)``; then schedules, metrics, evaluation, the target
test and checkpoints. Read top to bottom in :meth:`Trainer.fit`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from secondorder.data.loader import LoaderError
from secondorder.data.pipeline import as_loader_error
from secondorder.distributed.workers import WorkerFailure
from secondorder.optim.closure import BatchClosure, LossScaler, NonFiniteGradients
from secondorder.trainer.batchnorm import average_norm_statistics
from secondorder.trainer.checkpointing import Checkpointing
from secondorder.trainer.closing import Closing, Status
from secondorder.trainer.evaluation import evaluate
from secondorder.trainer.heartbeat import Heartbeat
from secondorder.trainer.noise_scale import meter_for
from secondorder.trainer.parts import DataFeed, RunOutput, RunParts
from secondorder.trainer.records import (
    MetricsFile,
    Throughput,
    progress_postfix,
)
from secondorder.trainer.schedules import make_schedule
from secondorder.trainer.settings import TrainerSettings, resolve_precision
from secondorder.trainer.signals import StopSignals


class Trainer(Checkpointing, Closing):
    """Data-parallel training of ``parts.model`` with ``parts.optimizer`` on ``data.train``.

    Args:
        settings: the loop's knobs (see :class:`TrainerSettings`).
        parts: model, optimizer, communicator, device.
        data: the splits, the task (what the targets are), this rank's sampler.
        output: run directory, names for the summary, logger.
    """

    def __init__(
        self, settings: TrainerSettings, parts: RunParts, data: DataFeed, output: RunOutput
    ):
        self.s = settings
        self.model, self.optimizer = parts.model, parts.optimizer
        self.comm, self.device = parts.comm, parts.device
        self.verify_every, self.overlap = parts.verify_every, parts.overlap
        self.data, self.task = data, data.task
        self.plan, self.sampler = data.plan, data.sampler
        self.run_dir, self.names = Path(output.run_dir), output.names
        self.options = output.options
        self.logger = output.logger
        self.loader, self.eval_loader = data.loaders(
            self.device,
            rank=self.comm.rank,
            world_size=self.comm.world_size,
            total_steps=settings.max_steps,
        )
        self.normalization = getattr(data.train, "normalization", None)  # for uint8 inputs
        self.throughput = Throughput(
            rank_batch=self.plan.per_rank, global_batch=self.plan.global_batch
        )
        self.schedule = make_schedule(settings.lr_schedule, total_steps=settings.max_steps)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.precision = resolve_precision(settings.precision, self.device)  # "auto" resolved
        self.autocast = _autocast_factory(self.precision, self.device)
        self.loss_scaler = LossScaler() if self.precision == "fp16" else None
        self.signals = StopSignals()
        self.noise = meter_for(settings, self.plan, world_size=self.comm.world_size)
        self.step = 0
        self.sent_bytes, self.sent_steps = 0, 0  # training steps' traffic since the last record
        self.comm_wait_s = 0.0  # seconds blocked on gradient communication since then
        self.elapsed_before = 0.0  # wall time of earlier segments of a resumed run
        self.heartbeat = Heartbeat(
            self.run_dir, rank=self.comm.rank, world_size=self.comm.world_size
        )
        self.last_train_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self.reached: dict[str, float] | None = None
        self.skipped_images: int | None = None  # unreadable images skipped, all ranks

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps``, the target, divergence or a stop signal; return a summary."""
        resumed_from = self._resume()
        main = self.comm.is_main
        metrics = (
            MetricsFile(self.run_dir / "metrics.jsonl", resume_step=resumed_from) if main else None
        )
        self.start_time = time.perf_counter()
        status: Status = "completed"
        error: str | None = None
        bar = tqdm(
            total=self.s.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (main and self.s.progress),
            dynamic_ncols=True,
        )
        self.signals.install()
        failure: BaseException | None = None
        try:
            status, error = _reporting_dead_workers(self._loop, metrics, bar)
        except (WorkerFailure, LoaderError) as err:  # neither a bug nor the user's: exit 1
            status, error = "failed", f"{type(err).__name__}: {err}"
            print(f"error: {err}", file=sys.stderr, flush=True)
        except BaseException as err:
            failure = err
            status, error = "failed", f"{type(err).__name__}: {err}"
            raise
        finally:
            self.close_loaders()
            bar.close()
            self.signals.restore()
            if main:
                summary = self._close_records(metrics, status, error, failure)
            else:
                summary = self._summary(status, error)
        return summary

    def close_loaders(self) -> None:
        """Stop the loaders' background work and worker processes (idempotent)."""
        try:
            self.loader.close()
        finally:
            self.eval_loader.close()

    def _loop(self, metrics: MetricsFile | None, bar: tqdm) -> tuple[Status, str | None]:
        """The steps, then the closing evaluation and checkpoint; returns status and error.

        A stop request is taken after a step's log, evaluation, target test and checkpoint, so
        a run resumed from the stop's checkpoint records exactly what an uninterrupted run does.
        """
        status: Status = "completed"
        while self.step < self.s.max_steps:
            loss = self._train_step()
            bar.update(1)
            if loss is None and self.loss_scaler.exhausted:
                self._log(metrics, {"train_loss": None, **self._step_counts()})
                return "diverged", (
                    f"float16 gradients overflowed {self.loss_scaler.consecutive_skips} steps "
                    f"in a row up to step {self.step}: the loss scale fell below "
                    f"{self.loss_scaler.min_scale:g}"
                )
            if loss is not None and not torch.isfinite(loss):
                self._log(metrics, {"train_loss": float(loss)})
                return "diverged", f"loss became {float(loss)} at step {self.step}"
            if self.step % self.s.log_every == 0 or self.step == self.s.max_steps:
                record = {**self._diagnostics(), **self._step_counts()}
                self._log(metrics, record)
                bar.set_postfix(progress_postfix(record))
            if self.s.eval_every and self.step % self.s.eval_every == 0:
                self._evaluate(metrics, bar)
                if self._target_met():
                    status = "target_reached"
                    break
            if self.verify_every and self.step % self.verify_every == 0:
                self.comm.verify_parameters(self.model.parameters(), step=self.step)
            every = self.s.checkpoint_every
            checkpointed = bool(every) and self.step % every == 0
            if checkpointed:
                self._save_checkpoint()
            # The last step finishes the run anyway: a signal then changes nothing.
            stop = self.signals.requested(self.comm, self.device)
            if stop is not None and self.step < self.s.max_steps:
                if not checkpointed:
                    self._save_checkpoint()
                return "failed", (
                    f"stopped by signal {stop} after step {self.step}; "
                    "resume with trainer.resume=auto"
                )
        # After the last step: evaluate and checkpoint unless that step already did.
        if self.s.eval_every == 0 or self.step % self.s.eval_every:
            self._evaluate(metrics, bar)
            if status == "completed" and self._target_met():
                status = "target_reached"
        if self.s.checkpoint_every and self.step % self.s.checkpoint_every:
            self._save_checkpoint()
        return status, None

    def _train_step(self) -> torch.Tensor | None:
        """One optimizer step; ``None`` when float16 loss scaling skipped it."""
        started = time.perf_counter()
        batches = [
            self.task.to_device(inputs, labels, self.device, self.normalization)
            for inputs, labels in self.loader.batches(self.step)
        ]
        waited = time.perf_counter() - started
        measure = self.noise is not None and self.noise.measures(self.step + 1)
        closure = BatchClosure(
            model=self.model,
            micro_batches=batches,
            loss_kind=self.task.loss,
            comm=self.comm,
            autocast=self.autocast,
            loss_scaler=self.loss_scaler,
            bucket_mb=self.s.grad_bucket_mb,
            overlap=self.overlap,
            label_smoothing=self.s.label_smoothing,
            **(self.noise.closure_options() if measure else {}),
        )
        multiplier = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
        self.step += 1
        sent_before = self.comm.stats.bytes
        try:
            loss = self.optimizer.step(closure)
            if measure:  # its scalar all-reduce is this step's traffic
                self.noise.update_from_closure(closure, self.comm)
        except NonFiniteGradients:
            self.loss_scaler.update(found_inf=True)
            # A skipped step has no loss of its own; an earlier step's must not pass for it.
            self.last_train_loss = None
            self.throughput.add(wait_s=waited, step_s=time.perf_counter() - started)
            return None
        finally:
            self.sent_bytes += self.comm.stats.bytes - sent_before
            self.sent_steps += 1
            self.comm_wait_s += closure.comm_wait_s
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_inf=False)
        self.last_train_loss = float(loss)  # waits for the device: the step's end
        self.throughput.add(wait_s=waited, step_s=time.perf_counter() - started)
        return loss

    def _step_counts(self) -> dict[str, int]:
        """Steps float16 loss scaling skipped so far (only with ``precision=fp16``)."""
        if self.loss_scaler is None:
            return {}
        return {"skipped_steps": self.loss_scaler.skipped_steps}

    # -- records --------------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def _diagnostics(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "train_loss": self.last_train_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if self.noise is not None:
            record.update(self.noise.record())
        # Optimizers keep per-step diagnostics as numbers or 0-d tensors; reading them only at
        # log steps keeps host synchronisation out of the other steps.
        extra = getattr(self.optimizer, "diagnostics", None)
        if isinstance(extra, dict):
            record.update(
                {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
            )
        reset = getattr(self.optimizer, "reset_diagnostics_interval", None)
        if callable(reset):  # interval means (K-FAC's time_*_s) cover the steps since this record
            reset()
        # The communicator's own count (every kind of collective), per training step since the
        # previous record; what evaluation, checkpoints and rank checks send is not a step's.
        record["comm_bytes"] = self.sent_bytes / max(self.sent_steps, 1)
        record["comm_wait_s"] = self.comm_wait_s / max(self.sent_steps, 1)
        # Datasets decoded per item (image folders) skip unreadable files and count them.
        skipped = [getattr(split, "skipped", None) for split in (self.data.train, self.data.eval)]
        if any(count is not None for count in skipped):
            total = torch.tensor([float(sum(c or 0 for c in skipped))], device=self.device)
            self.comm.all_reduce(total, op="sum")
            self.skipped_images = record["skipped_images"] = int(total.item())
        # Every rank is here: its heartbeat file shows a straggler or a rank waiting for data.
        self.heartbeat.beat(
            step=self.step,
            steps=self.sent_steps,
            data_wait_s=self.throughput.wait_s,
            started=self.start_time,
        )
        record.update(self.throughput.record())
        self.sent_bytes, self.sent_steps, self.comm_wait_s = 0, 0, 0.0
        return record

    def _log(self, metrics: MetricsFile | None, values: dict[str, Any]) -> None:
        if metrics is None:
            return
        record = {
            "step": self.step,
            "epoch": self.step / self.sampler.steps_per_epoch,
            "samples": self.step * self.plan.global_batch,
            **values,
            "elapsed_s": self._elapsed(),
        }
        metrics.write(record)
        self.logger.log(record, step=self.step)

    def _evaluate(self, metrics: MetricsFile | None, bar: tqdm) -> None:
        average_norm_statistics(self.model, self.comm)  # every rank evaluates the same model
        swap = getattr(self.optimizer, "evaluation_weights", None)
        with swap() if callable(swap) else contextlib.nullcontext():
            self.last_eval = evaluate(
                self.model,
                self.eval_loader,
                task=self.task,
                comm=self.comm,
                device=self.device,
                autocast=self.autocast,
                normalization=getattr(self.data.eval, "normalization", None),
            )
        self._log(metrics, dict(self.last_eval))
        bar.set_postfix({k.replace("eval_", ""): f"{v:.4f}" for k, v in self.last_eval.items()})

    def _target_met(self) -> bool:
        metric, value = self.s.target.metric, self.s.target.value
        if metric is None or value is None:
            return False
        if self.reached is None:
            current = self.last_train_loss if metric == "train_loss" else self.last_eval.get(metric)
            if current is not None and (
                current >= value if metric.endswith("accuracy") else current <= value
            ):
                self.reached = {"steps": self.step, "wall_s": self._elapsed()}
        return self.reached is not None


def _reporting_dead_workers(loop: Callable[..., Any], *args: Any) -> Any:
    """``loop(*args)``, with a loader worker's death raised as :class:`LoaderError`: torch's
    SIGCHLD handler (set once per process by any DataLoader iterated in the main thread) raises
    it as a plain RuntimeError wherever the main thread happens to be."""
    try:
        return loop(*args)
    except RuntimeError as err:
        dead = as_loader_error(err)
        if dead is err:
            raise
        raise dead from err


def _autocast_factory(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
