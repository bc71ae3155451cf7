"""The trainer's checkpoints: what a checkpoint holds, writing it, and resuming from one.

A mixin of :class:`~secondorder.trainer.trainer.Trainer`, kept apart so the loop reads in one
file and what makes a resume bitwise exact (model, optimizer, loss scale, every rank's RNG, the
record's state) reads in another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from secondorder.trainer import checkpoint as ckpt
from secondorder.trainer.batchnorm import average_norm_statistics


class Checkpointing:
    """Checkpoint methods of the trainer; they use its attributes (model, optimizer, comm, ...)."""

    model: Any
    optimizer: Any
    comm: Any
    loss_scaler: Any
    noise: Any
    names: dict[str, str]
    options: dict[str, dict]
    plan: Any
    sampler: Any
    s: Any
    run_dir: Any
    step: int
    elapsed_before: float
    last_train_loss: float | None
    last_eval: dict[str, float]
    reached: dict[str, float] | None
    _elapsed: Callable[[], float]

    def _evaluation_state(self) -> dict[str, torch.Tensor]:
        """The weights a user evaluates: an optimizer's evaluation weights where it has them
        (Neumann's ``w - μ m``), otherwise the parameters themselves."""
        swap = getattr(self.optimizer, "evaluation_weights", None)
        with swap() if callable(swap) else contextlib.nullcontext():
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _meta(self) -> dict[str, Any]:
        return {
            **self.names,
            "world_size": self.comm.world_size,
            "global_batch_size": self.plan.global_batch,
            "fingerprint": ckpt.fingerprint(
                model=self.names.get("model", ""),
                model_options=self.options.get("model", {}),
                data=self.names.get("data", ""),
                data_options=self.options.get("data", {}),
                train_samples=self.sampler.num_samples,
                seed=self.sampler.seed,
            ),
        }

    def _save_checkpoint(self) -> None:
        average_norm_statistics(self.model, self.comm)  # the saved model is every rank's
        rng = self.comm.all_gather_object(ckpt.capture_rng())
        if not self.comm.is_main:
            return
        payload = {
            "meta": self._meta(),
            "step": self.step,
            "elapsed_s": self._elapsed(),
            # "model" is the optimizer's iterate (what resuming needs); "evaluation_model" the
            # weights to evaluate or deploy, which differ for optimizers like Neumann's.
            "model": self.model.state_dict(),
            "evaluation_model": self._evaluation_state(),
            "optimizer": self.optimizer.state_dict(),
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler else None,
            "rng": rng,
            "trainer": {
                "last_train_loss": self.last_train_loss,
                "last_eval": self.last_eval,
                "reached": self.reached,
                "noise_scale": self.noise.state_dict() if self.noise is not None else None,
            },
        }
        ckpt.save_checkpoint(
            payload, run_dir=self.run_dir, step=self.step, keep=self.s.keep_checkpoints
        )

    def _resume(self) -> int | None:
        # Rank 0 picks the file and tells every rank, a refusal too: none waits in a collective.
        found, refusal = None, None
        if self.comm.is_main:
            try:
                found = ckpt.find_resume(self.s.resume, self.run_dir, expect=self._meta())
            except ckpt.CheckpointError as err:
                refusal = str(err)
        path, refusal = self.comm.broadcast_object((str(found[0]) if found else None, refusal))
        if refusal is not None:
            raise ckpt.CheckpointError(refusal)
        if path is None:
            return None
        payload = found[1] if found else ckpt.load_checkpoint(path, expect=self._meta())
        ckpt.restore_state(path, "model", self.model, payload["model"])
        ckpt.restore_state(path, "optimizer", self.optimizer, payload["optimizer"])
        if self.loss_scaler is not None and payload["loss_scaler"] is not None:
            ckpt.restore_state(path, "loss scaler", self.loss_scaler, payload["loss_scaler"])
        ckpt.restore_rng(payload["rng"][self.comm.rank])
        self.step = payload["step"]
        self.elapsed_before = payload["elapsed_s"]
        state = payload["trainer"]
        self.last_train_loss, self.last_eval = state["last_train_loss"], state["last_eval"]
        self.reached = state["reached"]
        if self.noise is not None and state.get("noise_scale") is not None:
            self.noise.load_state_dict(state["noise_scale"])
        if self.comm.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)
        return self.step
