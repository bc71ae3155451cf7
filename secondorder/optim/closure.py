"""The closure every optimizer receives: ``loss = optimizer.step(closure)``.

Calling the closure zeroes the gradients, runs forward and backward over this rank's
micro-batches (gradient accumulation), averages the gradients over ranks through the
communicator and returns the global mean loss — the ``torch.optim.LBFGS`` convention. Methods
that need more than a gradient (curvature-vector products, sampled-target statistics, line
searches) read what they need from the same object: ``model``, ``micro_batches``, ``loss_kind``,
``comm``, and :meth:`BatchClosure.evaluate` for a forward-only loss.

Plain PyTorch use::

    closure = BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy")
    loss = optimizer.step(closure)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from secondorder.distributed.communicator import BUCKET_MB
from secondorder.distributed.overlap import GradientReducer, squared_norm
from secondorder.optim.losses import LossKind, loss_value


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Train-mode batch norm keeps using batch statistics but stops updating running ones."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class NonFiniteGradients(RuntimeError):
    """Raised by the closure when loss scaling finds inf/NaN gradients: skip this step."""


class LossScaler:
    """Dynamic loss scaling for float16 (the scheme of mixed-precision training).

    The closure multiplies the loss by ``scale`` before backward and divides the gradients after;
    an overflow halves the scale and the step is skipped, ``growth_interval`` clean steps double
    it. Once the scale has fallen below ``min_scale`` the gradients overflow float16 even
    unscaled (from the initial 2**16 that takes 17 overflows in a row): no smaller scale can
    help, :attr:`exhausted` is true and the trainer ends the run as diverged instead of skipping
    every step that follows. State, the count of skipped steps included, round-trips through
    ``state_dict`` for exact resume.
    """

    def __init__(
        self, *, init_scale: float = 2.0**16, growth_interval: int = 2000, min_scale: float = 1.0
    ):
        if not 0 < min_scale <= init_scale:
            raise ValueError(f"Invalid min_scale: {min_scale} (0 < min_scale <= {init_scale})")
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.min_scale = float(min_scale)
        self.clean_steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0

    @property
    def exhausted(self) -> bool:
        """Whether the scale fell below ``min_scale``: the run has diverged."""
        return self.scale < self.min_scale

    def update(self, *, found_inf: bool) -> None:
        if found_inf:
            self.scale /= 2.0
            self.clean_steps = 0
            self.skipped_steps += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale *= 2.0
                self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "clean_steps": self.clean_steps,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        # Checkpoints written before skipped steps were counted lack the two counts.
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


class BatchClosure:
    """Forward/backward over one global batch's local micro-batches.

    Args:
        model: the network.
        micro_batches: this rank's ``(inputs, targets)`` pairs, all of the same size.
        loss_kind: see :mod:`secondorder.optim.losses`.
        comm: communicator for the gradient and loss averages; ``None`` means one process.
        autocast: context factory for mixed precision (``None``: full precision).
        loss_scaler: float16 loss scaling; ``None`` for float32/bfloat16.
        bucket_mb: gradient all-reduce bucket size.
        overlap: launch the gradient all-reduce bucket by bucket during the last micro-batch's
            backward (:mod:`secondorder.distributed.overlap`) instead of after it; the average
            is the same. Only the gradient pass of ``__call__`` communicates gradients.
        measure_local_grad: set :attr:`local_grad_sq_norm` at every call.

    Attributes:
        comm_wait_s: seconds the calls so far blocked on the gradient all-reduce after backward
            (with overlap: waiting for the buckets still in flight; without: all of it).
        local_grad_sq_norm: with ``measure_local_grad``, the squared norm of this rank's own
            gradient (mean over its micro-batches, loss scale removed) before the average over
            ranks, a 0-d tensor; ``None`` otherwise.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        loss_kind: LossKind,
        comm: Any = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        loss_scaler: LossScaler | None = None,
        bucket_mb: float = BUCKET_MB,
        overlap: bool = True,
        measure_local_grad: bool = False,
    ):
        if not micro_batches:
            raise ValueError("BatchClosure needs at least one micro-batch")
        self.model = model
        self.micro_batches = list(micro_batches)
        self.loss_kind = loss_kind
        self.comm = comm
        self.autocast = autocast or contextlib.nullcontext
        self.loss_scaler = loss_scaler
        self.bucket_mb = bucket_mb
        self.overlap = overlap
        self.measure_local_grad = measure_local_grad
        self.evaluations = 0
        self.comm_wait_s = 0.0
        self.local_grad_sq_norm: torch.Tensor | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            outputs = self.model(inputs)
        if outputs.dtype in (torch.float16, torch.bfloat16):  # the loss in at least float32
            outputs = outputs.float()
        return loss_value(self.loss_kind, outputs, targets)

    def __call__(self) -> torch.Tensor:
        params = self.params
        for p in params:
            p.grad = None
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        weight = 1.0 / len(self.micro_batches)
        distributed = self.comm is not None and self.comm.world_size > 1
        reducer = None
        if distributed and self.overlap:
            reducer = GradientReducer(
                self.comm, params, bucket_mb=self.bucket_mb, measure_local=self.measure_local_grad
            )
        total: torch.Tensor | None = None
        last = len(self.micro_batches) - 1
        for index, (inputs, targets) in enumerate(self.micro_batches):
            loss = self.loss_of(inputs, targets)
            # Earlier micro-batches accumulate locally; the last one's backward reduces.
            arm = reducer is not None and index == last
            with reducer.armed() if arm else contextlib.nullcontext():
                (loss * (weight * scale)).backward()
            part = loss.detach() * weight
            total = part if total is None else total + part
        self._reduce_gradients(params, reducer)
        if self.measure_local_grad and self.local_grad_sq_norm is not None:
            self.local_grad_sq_norm = self.local_grad_sq_norm / scale**2
        if self.comm is not None:
            self.comm.all_reduce(total, op="avg")
        if self.loss_scaler is not None:
            self._unscale(params, scale)
        self.evaluations += 1
        return total

    def _reduce_gradients(self, params: list[nn.Parameter], reducer: GradientReducer | None):
        """Average the gradients over ranks (what is still to do after backward), timed."""
        if reducer is None and self.measure_local_grad:
            self.local_grad_sq_norm = squared_norm([p.grad for p in params if p.grad is not None])
        start = time.perf_counter()
        if reducer is not None:
            reducer.finish()
            self.local_grad_sq_norm = reducer.local_sq_norm
        elif self.comm is not None:
            self.comm.all_reduce_gradients(params, bucket_mb=self.bucket_mb)
        self.comm_wait_s += time.perf_counter() - start

    def _unscale(self, params: list[nn.Parameter], scale: float) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            g.mul_(1.0 / scale)
        finite = torch.stack([g.isfinite().all() for g in grads]).all()
        if not bool(finite):  # one host sync per step, only with float16 loss scaling
            raise NonFiniteGradients(f"inf/NaN gradients at loss scale {scale}")

    @torch.no_grad()
    def evaluate(self) -> torch.Tensor:
        """Forward-only global mean loss at the current parameters (for line searches).

        Batch norm uses batch statistics, as in training, without updating running ones: trial
        points of a line search must not leave traces in the model.
        """
        total: torch.Tensor | None = None
        with frozen_norm_statistics(self.model):
            for inputs, targets in self.micro_batches:
                part = self.loss_of(inputs, targets) / len(self.micro_batches)
                total = part if total is None else total + part
        if self.comm is not None:
            self.comm.all_reduce(total, op="avg")
        return total
