"""The worker side of :mod:`.workers`: one process running a pure function over shared tensors.

A :class:`Job` names the function and the shapes of its tensors. The parent creates, per
worker, one shared input slot, TWO shared output slots and a float64 control vector (the layout
below), all with ``share_memory_()`` before the process is spawned. The two sides coordinate
through sequence locks: a slot's sequence number is odd while it is being written, so a reader
that sees it odd, or changed after its copy, reads again and never uses a torn snapshot.
:func:`worker_main` is the process's loop: newest input snapshot -> ``job.fn`` -> the output slot
not holding its newest result, stamped with a version.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from secondorder.distributed.parent_watch import watch_parent

__all__ = ["Job", "PureFunction", "Spec", "shared_tensors", "worker_main"]

Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
PureFunction = Callable[[dict[str, Tensor], dict[str, Any]], dict[str, Tensor]]

# Layout of each worker's shared float64 control vector (integers are exact below 2**53).
IN_SEQ, IN_VERSION, OUT_SEQ, OUT_VERSION = 0, 1, 2, 4  # OUT_*: two entries, one per slot
HEARTBEAT, BUSY_S, STOP, ERRORS, ITERATION = 6, 7, 8, 9, 10
CONTROL_SIZE = 11


@dataclass(frozen=True)
class Job:
    """One worker's work: ``fn`` (module-level, so ``spawn`` can pickle it by name) maps a
    snapshot of ``inputs`` and the plain-data ``options`` to tensors of ``outputs``' shapes.

    ``repeat=False``: ``fn`` runs once per published snapshot and its output is stamped with the
    snapshot's version. ``repeat=True``: ``fn`` runs again and again on the newest snapshot
    (e.g. statistics on fresh mini-batches); it is called with ``options`` plus ``"iteration"``
    (0, 1, 2, … over the worker's life, restarts included) and ``"version"`` (the snapshot's),
    and its output is stamped with ``iteration + 1``, the count of results so far.
    """

    fn: PureFunction
    inputs: Spec
    outputs: Spec
    options: dict[str, Any] = field(default_factory=dict)
    repeat: bool = False


def shared_tensors(spec: Spec) -> dict[str, Tensor]:
    """Zero tensors of ``spec``'s shapes in shared memory (created before the spawn)."""
    return {
        key: torch.zeros(shape, dtype=dtype).share_memory_() for key, (shape, dtype) in spec.items()
    }


def worker_main(
    job: Job,
    inputs: dict[str, Tensor],
    slots: list[dict[str, Tensor]],
    control: Tensor,
    threads: int,
    poll_s: float,
    parent: int,
    cpus: list[int] | None = None,
) -> None:
    """The loop of one worker process: newest snapshot → ``job.fn`` → the older output slot.

    It dies with ``parent`` (its training rank), also in the middle of a long ``job.fn``: a
    worker holds nothing worth saving, so SIGKILL at once (see :mod:`.parent_watch`).
    """
    watch_parent(parent=parent, signum=signal.SIGKILL, grace_s=None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the trainer, which stops us
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    c = control.numpy()
    done = -1.0
    while c[STOP] == 0 and os.getppid() == parent:
        c[HEARTBEAT] = time.time()
        seq = c[IN_SEQ]
        if (seq == done and not job.repeat) or seq % 2 == 1 or seq == 0:
            time.sleep(poll_s)
            continue
        version = c[IN_VERSION]
        snapshot = {k: t.clone() for k, t in inputs.items()}
        if c[IN_SEQ] != seq:  # the trainer wrote meanwhile: read again
            continue
        start = time.perf_counter()
        options, stamp = job.options, version
        if job.repeat:
            iteration = int(c[ITERATION])
            options = {**job.options, "iteration": iteration, "version": int(version)}
            stamp = iteration + 1
        try:
            outputs = job.fn(snapshot, options)
        except Exception:  # noqa: BLE001 - counted; the trainer keeps its last good outputs
            traceback.print_exc()
            c[ERRORS] += 1
            done = seq
            if job.repeat:  # a repeating job moves on to the next draw
                c[ITERATION] += 1
                time.sleep(poll_s)
            continue
        _write_output(c, slots, outputs, stamp, repeat=job.repeat)
        c[BUSY_S] += time.perf_counter() - start
        c[HEARTBEAT] = time.time()
        done = seq


def _write_output(
    c: Any,
    slots: list[dict[str, Tensor]],
    outputs: dict[str, Tensor],
    stamp: float,
    *,
    repeat: bool,
) -> None:
    """Copy ``outputs`` into the slot holding the older result, under its sequence lock."""
    slot = 0 if c[OUT_VERSION] <= c[OUT_VERSION + 1] else 1
    c[OUT_SEQ + slot] += 1  # odd: being written
    for key, tensor in slots[slot].items():
        tensor.copy_(outputs[key])
    c[OUT_VERSION + slot] = stamp
    if repeat:
        c[ITERATION] += 1
    c[OUT_SEQ + slot] += 1
