"""Persistent worker processes that prepare groups of micro-batches ahead, in order.

A group is a training step (or an evaluation batch): its indices are split into one chunk per
worker, so every worker prepares part of every group, and the chunks are joined again in order.
The basis is torch's ``DataLoader`` with ``persistent_workers`` (its worker start, liveness
checks, prefetch and shutdown are maintained there); a "batch" of it is one chunk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from secondorder.data.core import DataError

__all__ = [
    "Batch",
    "Group",
    "LoaderError",
    "WorkerPipeline",
    "as_loader_error",
    "load_items",
    "sample_seed",
]

Batch = tuple[torch.Tensor, torch.Tensor]


class LoaderError(RuntimeError):
    """A loader worker died or failed on something other than the user's data."""


def sample_seed(seed: int, step: int, position: int) -> int:
    """Seed of the augmentation of the sample at ``position`` of global step ``step``'s batch."""
    return ((seed * 1_000_003 + step) * 1_000_033 + position) % (2**63)


def load_items(dataset: Any, indices: list[int], *, seed: int, step: int | None, start: int):
    """Prepare ``indices`` in this process: stacked inputs and int64 labels. With ``step``
    (training), item ``i`` is at global position ``start + i``: a data set with ``sample`` gets
    that position's generator, others are read with torch's global RNG seeded from it (and
    restored after, so this process's own random stream does not move). Evaluation
    (``step=None``) reads ``dataset[index]``."""
    sample = getattr(dataset, "sample", None)
    inputs, labels = [], []
    for offset, index in enumerate(indices):
        if step is None:
            x, y = dataset[index]
        elif sample is not None:
            generator = torch.Generator().manual_seed(sample_seed(seed, step, start + offset))
            x, y = sample(index, generator)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(seed, step, start + offset))
                x, y = dataset[index]
        inputs.append(torch.as_tensor(x))
        labels.append(int(y))
    return torch.stack(inputs), torch.tensor(labels, dtype=torch.int64)


# -- persistent workers ---------------------------------------------------------------------------


class Group(NamedTuple):
    """What one ``get`` returns: micro-batches of these indices (a step, or an eval batch)."""

    micro: list[torch.Tensor]
    step: int | None
    start: int  # global position of the first sample (augmentation seeds)


class _Chunk(NamedTuple):
    step: int | None
    start: int
    indices: list[int]


class _Failed(NamedTuple):
    """A worker's exception, sent back as a value: one line for the user, no traceback."""

    data_error: bool
    message: str


def _chunks(group: Group, count: int) -> list[_Chunk]:
    flat = torch.cat(group.micro) if group.micro else torch.empty(0, dtype=torch.int64)
    out, start = [], group.start
    for piece in flat.tensor_split(count):
        out.append(_Chunk(group.step, start, piece.tolist()))
        start += len(piece)
    return out


class _ChunkDataset(Dataset):
    """What a worker holds: the data set; a "batch" is one :class:`_Chunk`."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, chunk: _Chunk) -> Batch | _Failed | None:
        if not chunk.indices:
            return None
        try:
            return load_items(
                self.dataset, chunk.indices, seed=self.seed, step=chunk.step, start=chunk.start
            )
        except Exception as err:  # noqa: BLE001 - reported to the trainer as one line
            return _Failed(isinstance(err, DataError), f"{type(err).__name__}: {err}")


class _ChunkPlan:
    """The ``DataLoader``'s batch sampler: the chunks of groups ``start``, ``start + 1``, ..."""

    def __init__(self, group: Callable[[int], Group], chunks: int):
        self.group, self.chunks = group, chunks
        self.start, self.stop = 0, 0

    def __iter__(self) -> Iterator[_Chunk]:
        for number in range(self.start, self.stop):
            yield from _chunks(self.group(number), self.chunks)


def _identity(batch: Any) -> Any:
    return batch


class WorkerPipeline:
    """Groups of micro-batches prepared by persistent worker processes, in order, ahead.

    A background thread owns the ``DataLoader`` iterator (created there, so torch installs no
    SIGCHLD handler that would raise in the middle of a training step): it receives each
    group's chunks, joins them and hands the group over through a one-slot queue. A dead worker
    surfaces within the ``DataLoader``'s liveness check (5 s) as :class:`LoaderError`.

    Workers are forked: they only run the data set's Python code, never CUDA or collectives,
    and start in milliseconds sharing the data set's index arrays.
    """

    def __init__(
        self,
        dataset: Dataset,
        group: Callable[[int], Group],
        *,
        seed: int,
        num_workers: int,
        prefetch_groups: int = 2,
        pin_device: torch.device | None = None,
    ):
        self.group, self.pin_device = group, pin_device
        self.plan = _ChunkPlan(group, num_workers)
        # Each worker holds one chunk of each group: prefetch_factor counts groups ahead.
        self.loader = DataLoader(
            _ChunkDataset(dataset, seed),
            batch_sampler=self.plan,  # type: ignore[arg-type]
            num_workers=num_workers,
            collate_fn=_identity,
            persistent_workers=True,
            prefetch_factor=prefetch_groups,
            multiprocessing_context="fork",
            # Its own generator for the workers' base seed: a draw from the global RNG, at a
            # moment set by this thread, would move the training process's random stream.
            generator=torch.Generator().manual_seed(seed),
        )
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._iterator: Any = None
        self.next: int | None = None  # the group the next get() returns
        self.closed = False

    def start(self, first: int, stop: int) -> None:
        """Prepare groups ``first, ..., stop - 1`` (drops whatever was prepared before)."""
        if self.closed:
            raise LoaderError("the data loader is closed")
        if not self._halt():
            raise LoaderError("the data loader did not stop within 60 s: a worker hangs")
        self.plan.start, self.plan.stop = first, stop
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(
            target=self._produce, args=(first, stop, self._stop, self._queue), daemon=True
        )
        self._thread.start()
        self.next = first

    def get(self) -> list[Batch]:
        """The next group's micro-batches; raises the pipeline's error if there was one."""
        while True:
            try:
                number, item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise LoaderError("the data loader thread stopped without a batch") from None
        if isinstance(item, BaseException):
            self.next = None
            self._halt()
            raise item
        assert number == self.next, f"loader returned group {number}, expected {self.next}"
        self.next = number + 1
        return item

    def _produce(self, first: int, stop: int, halt: threading.Event, out: queue.Queue) -> None:
        try:
            if self.pin_device is not None:  # pinned buffers belong to this rank's GPU
                torch.cuda.set_device(self.pin_device)
            # The first iter() starts the workers; later ones restart the same persistent
            # workers at plan.start, dropping chunks still in flight.
            self._iterator = iter(self.loader)
            for number in range(first, stop):
                parts = [self._receive() for _ in range(self.plan.chunks)]
                item: Any = _assemble(parts, self.group(number).micro, self.pin_device)
                if not _put(out, (number, item), halt):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            _put(out, (None, as_loader_error(err)), halt)

    def _receive(self) -> Batch | None:
        part = next(self._iterator)
        if isinstance(part, _Failed) and part.data_error:
            raise DataError(part.message)
        if isinstance(part, _Failed):
            raise LoaderError(f"data loader worker failed: {part.message}")
        return part

    def _halt(self, wait_s: float = 60.0) -> bool:
        """Stop the thread (the workers stay for the next start); whether it stopped."""
        if self._thread is None:
            return True
        self._stop.set()
        self._thread.join(timeout=wait_s)
        if self._thread.is_alive():
            return False
        self._thread = None
        return True

    def close(self) -> None:
        """Stop the thread and the worker processes; idempotent, never raises: it runs while
        a run ends, perhaps on another error. A thread still waiting for a hung worker after
        a few seconds gets its iterator shut down under it (it is a daemon thread)."""
        if self.closed:
            return
        self.closed = True
        self._halt(wait_s=10.0)
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            # The DataLoader keeps its persistent iterator alive, so dropping ours would leave
            # the workers running until garbage collection: stop them now.
            iterator._shutdown_workers()


def as_loader_error(err: BaseException) -> BaseException:
    """A worker's death as :class:`LoaderError`, whichever way it surfaced; others unchanged."""
    if isinstance(err, RuntimeError) and "DataLoader worker" in str(err):
        return LoaderError(f"data loader worker died: {str(err).splitlines()[0]}")
    if isinstance(err, (EOFError, ConnectionError)):  # a batch lost with the worker that made it
        return LoaderError(f"data loader worker died: {type(err).__name__}: {err}")
    return err


def _put(out: queue.Queue, item: Any, halt: threading.Event) -> bool:
    """Put ``item`` unless asked to stop first; whether it was put."""
    while not halt.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _assemble(
    parts: list[Batch | None], micro: list[torch.Tensor], pin_device: torch.device | None
) -> list[Batch]:
    """Join the chunks (in pinned memory for CUDA) and cut them into the micro-batches."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return []
    joined = []
    for tensors in zip(*parts, strict=True):
        shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
        out = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=pin_device is not None)
        joined.append(torch.cat(tensors, out=out))
    sizes = [len(m) for m in micro]
    return list(zip(joined[0].split(sizes), joined[1].split(sizes), strict=True))
