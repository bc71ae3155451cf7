"""Training batches decoded on the GPU by an NVIDIA DALI pipeline (``data.loader=dali``).

The sample order is the CPU loader's: this rank's indices of a step come from the same
:meth:`GlobalBatchSampler.indices`, so epochs, sharding by rank and resuming at any step behave
as they do there. The encoded file bytes (read and header-checked on the host, unreadable files
skipped as :class:`ImageFolderDataset` skips them) are fed to the pipeline through
``fn.external_source``; the pipeline decodes a random crop (``fn.decoders.image_random_crop``:
area 0.08-1, aspect ratio 3/4-4/3, only the crop's region decoded; on the GPU with
``device="mixed"``, nvJPEG), resizes it to ``image_size``, flips it at random and normalises it
with the ImageNet mean and std into float32 NCHW on the device. Labels are int64 on the device.

While the trainer computes step ``s``, a background thread reads and decodes step ``s + 1``.
Augmentation draws come from DALI's own generator, seeded from the run seed and the rank: they
are reproducible for a run from step 0 but, unlike the sample order, not across a resume.

DALI is an optional extra (``pip install '.[dali]'``); this module imports it only when a loader
is built. A ``cpu`` device runs the same pipeline with CPU operators (used by the tests where no
GPU exists).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from secondorder.data.image_transforms import CROP_RATIO, CROP_SCALE
from secondorder.data.imagenet_data import ImageFolderDataset
from secondorder.data.sampler import GlobalBatchSampler

__all__ = ["DaliStepLoader", "dali_unavailable_reason"]

_INSTALL_HINT = "NVIDIA DALI is not installed (pip install '.[dali]')"


def _import_problem() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return _INSTALL_HINT
    except Exception as err:  # noqa: BLE001 - a broken install fails in many ways
        return f"NVIDIA DALI does not import ({type(err).__name__}: {err})"
    return None


def dali_unavailable_reason() -> str | None:
    """Why the DALI loader cannot run here, in one line, or ``None`` when it can."""
    problem = _import_problem()
    if problem is not None:
        return problem
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    return None


def _pipeline(*, image_size: int, gpu: bool, mean: tuple, std: tuple, **pipeline_args: Any) -> Any:
    """The DALI pipeline: encoded bytes in (external source ``jpegs``), float32 NCHW out."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def train_pipeline() -> Any:
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        images = fn.decoders.image_random_crop(
            jpegs,
            device="mixed" if gpu else "cpu",
            output_type=types.RGB,
            random_area=list(CROP_SCALE),
            random_aspect_ratio=list(CROP_RATIO),
            num_attempts=10,
        )
        images = fn.resize(
            images,
            resize_x=image_size,
            resize_y=image_size,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        return fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in mean],
            std=[255.0 * s for s in std],
            mirror=fn.random.coin_flip(probability=0.5),
        )

    pipe = train_pipeline(**pipeline_args)
    pipe.build()
    return pipe


class DaliStepLoader:
    """This rank's training micro-batches of each step, decoded by DALI (a ``StepLoader``).

    Args:
        dataset: the train split (its paths, labels, ``image_size`` and ``normalization``).
        sampler: the run's global-batch sampler; it alone decides the order.
        device: where batches are produced: a CUDA device (GPU decode), or ``cpu`` (CPU
            operators, for tests).
        seed: the run's seed; DALI's generator is seeded from it and the rank.
        num_threads: DALI's CPU threads (``data.num_workers``; 0 means up to 4).
        prefetch: decode the next step in the background while the current one computes.

    Raises:
        RuntimeError: when DALI cannot run here (see :func:`dali_unavailable_reason`).
    """

    def __init__(
        self,
        *,
        dataset: ImageFolderDataset,
        sampler: GlobalBatchSampler,
        device: torch.device,
        seed: int,
        num_threads: int = 0,
        prefetch: bool = True,
    ) -> None:
        device = torch.device(device)
        reason = _import_problem() if device.type == "cpu" else dali_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"data.loader=dali: {reason}")
        self.dataset = dataset
        self.sampler = sampler
        self.device = device
        self.prefetch = prefetch
        gpu = device.type == "cuda"
        threads = num_threads if num_threads > 0 else min(4, os.cpu_count() or 1)
        mean, std = dataset.normalization
        self._pipe = _pipeline(
            image_size=dataset.image_size,
            gpu=gpu,
            mean=mean,
            std=std,
            batch_size=sampler.plan.per_rank,
            num_threads=threads,
            device_id=(device.index if device.index is not None else torch.cuda.current_device())
            if gpu
            else None,
            seed=(seed * 1_000_003 + sampler.rank) % 2**31,
            prefetch_queue_depth=1,
        )
        # Copies out of the pipeline run on their own stream, so they never wait for compute.
        self._copy_stream = torch.cuda.Stream(device) if gpu else None
        # One thread owns the pipeline: DALI pipelines are not for concurrent use.
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="dali-loader"
        )
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``(float32 images, int64 labels)`` micro-batches of step ``step``."""
        if self._executor is None:
            raise RuntimeError("DaliStepLoader is closed")
        future = self._pending.pop(step, None)
        for stale in self._pending.values():  # a jump (resume, evaluation order): start again
            stale.cancel()
        self._pending.clear()
        if future is None:
            future = self._executor.submit(self._load, step)
        images, targets = future.result()
        if self._copy_stream is not None:
            # Made on the copy stream, used on the trainer's: memory is not reused before the
            # trainer's work on it is done.
            consumer = torch.cuda.current_stream(self.device)
            images.record_stream(consumer)
            targets.record_stream(consumer)
        if self.prefetch:
            self._pending[step + 1] = self._executor.submit(self._load, step + 1)
        micro = self.sampler.plan.micro_batch
        return list(zip(images.split(micro), targets.split(micro), strict=True))

    def _load(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All of this rank's images and labels of ``step``, ready on the device."""
        encoded, labels = [], []
        for index in torch.cat(self.sampler.indices(step)).tolist():
            data, label = self.dataset.encoded(index)
            encoded.append(data)
            labels.append(label)
        (output,) = self._pipe.run(jpegs=encoded)
        if self._copy_stream is None:
            return self._copy(output, labels)
        with torch.cuda.stream(self._copy_stream):
            result = self._copy(output, labels)
        # The pipeline reuses its output buffer on the next run: the copy must be done.
        self._copy_stream.synchronize()
        return result

    def _copy(self, output: Any, labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = output.as_tensor()
        images = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(tensor, images, cuda_stream=self._copy_stream)
        targets = torch.tensor(labels, dtype=torch.int64).to(self.device, non_blocking=True)
        return images, targets

    def close(self) -> None:
        """Stops the background decode and frees the pipeline; idempotent."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is None:
            return
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        executor.shutdown(wait=True)
        self._pipe = None

    def __del__(self) -> None:
        if getattr(self, "_executor", None) is not None:
            self.close()
