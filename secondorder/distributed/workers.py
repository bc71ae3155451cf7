"""Asynchronous worker processes: a generic executor of pure functions over shared tensors.

Ba, Grosse & Martens 2017, "Distributed Second-Order Optimization using Kronecker-Factored
Approximations", section 5: curvature changes slowly, so the factor inversions can run
asynchronously on CPUs while the training ranks go on with the newest completed result. This
module is the "how" of that: it knows nothing of K-FAC (``distributed/`` never imports
``optim/``). An optimizer hands it :class:`Job` s — a module-level pure function
``fn(inputs, options) -> outputs`` with the shapes of its tensors — and then:

- ``publish(inputs, version)`` copies a snapshot into each worker's shared input slot (a
  sequence lock: odd while being written, so a worker never reads a torn snapshot);
- each worker (a ``spawn``-started process running :func:`~.worker_loop.worker_main`,
  ``torch.set_num_threads(threads)``) computes on the newest snapshot only and writes into one of
  TWO shared output slots, the one not holding its newest result, stamped with the snapshot's
  version (again under a sequence lock);
- ``newest(j)`` copies worker ``j``'s newest completed output; ``wait(j, version)`` blocks until
  that version is done (bounded by a timeout, then the caller computes in-process).

Every shared tensor is created with ``share_memory_()`` BEFORE the processes are spawned and is
passed at start; torch's ``file_descriptor`` strategy unlinks the ``/dev/shm`` file at creation,
so nothing is left behind even if the trainer is killed. Workers die with their parent
(:func:`~.parent_watch.watch_parent`: ``PR_SET_PDEATHSIG`` where available, plus a parent-pid
check), and a training rank dies with its launcher the same way, so a launcher killed outright
leaves no rank and no worker behind.

Health: every worker stamps a heartbeat each poll and between jobs. :meth:`WorkerPool.check`
restarts a worker that exited or whose heartbeat is older than ``heartbeat_s`` (stuck), up to
``max_restarts`` restarts in total; beyond that it raises :class:`WorkerFailure`. The caller
keeps using its last good outputs meanwhile.

``mode="sync"``: no processes; ``publish`` runs the functions in-process at once (deterministic,
for tests and reproducibility). ``mode="async"`` with waits at every publish gives the same
numbers (on CPU, same threads).

K-FAC's use of it (its settings, and the context manager that runs the workers for a training
run) lives in :mod:`secondorder.optim.kfac.async_curvature`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.multiprocessing as mp
from torch import Tensor

from secondorder.distributed.worker_loop import (
    BUSY_S,
    CONTROL_SIZE,
    ERRORS,
    HEARTBEAT,
    IN_SEQ,
    IN_VERSION,
    OUT_SEQ,
    OUT_VERSION,
    STOP,
    Job,
    shared_tensors,
    worker_main,
)

__all__ = ["Job", "WorkerFailure", "WorkerPool", "available_cpus", "to_device"]


class WorkerFailure(RuntimeError):
    """A worker died (or got stuck) more often than ``max_restarts`` allows."""


def available_cpus() -> set[int] | None:
    """The CPU ids this process may run on (``None``: the platform cannot say)."""
    getter = getattr(os, "sched_getaffinity", None)
    return None if getter is None else set(getter(0))


def _copy(tensor: Tensor, *, pin: bool) -> Tensor:
    if not pin:
        return tensor.clone()
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A worker's CPU result on the training device: from page-locked memory a CUDA copy is
    queued on the current stream without a host wait (the caching host allocator keeps the
    pinned block alive until the copy has run); elsewhere a plain ``to``."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.to(device, non_blocking=tensor.is_pinned())
    return tensor.to(device)


class WorkerPool:
    """Worker processes (or in-process functions in ``sync`` mode) over shared tensors.

    Args:
        jobs: one :class:`Job` per worker.
        mode: ``"sync"`` (in-process, at publish) or ``"async"`` (spawned processes).
        threads: torch threads of each worker process.
        heartbeat_s: a worker whose heartbeat is older is restarted.
        max_restarts: restarts allowed over the pool's life before :class:`WorkerFailure`.
        poll_s: a worker's sleep between looks at its input slot.
        name: what the workers do, in messages (``"inversion"``, ``"statistics"``).
        pin_memory: :meth:`newest` copies into page-locked memory (when CUDA is available), so
            that :func:`to_device` moves the result to the GPU without blocking the host.
        cpus: CPU ids the worker processes are bound to (Linux ``sched_setaffinity``; ``None``:
            the parent's).
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        *,
        mode: Literal["sync", "async"],
        threads: int = 1,
        heartbeat_s: float = 30.0,
        max_restarts: int = 3,
        poll_s: float = 0.002,
        name: str = "curvature",
        pin_memory: bool = False,
        cpus: Sequence[int] | None = None,
    ):
        if mode not in ("sync", "async"):
            raise ValueError(f"Invalid mode: {mode!r} (sync | async)")
        if threads < 1:
            raise ValueError(f"Invalid threads: {threads}")
        if not heartbeat_s > 0:
            raise ValueError(f"Invalid heartbeat_s: {heartbeat_s}")
        if max_restarts < 0:
            raise ValueError(f"Invalid max_restarts: {max_restarts}")
        self.jobs, self.mode, self.threads = list(jobs), mode, threads
        self.heartbeat_s, self.max_restarts, self.poll_s = heartbeat_s, max_restarts, poll_s
        self.name, self.pin_memory = name, pin_memory and torch.cuda.is_available()
        self.cpus = None if cpus is None else list(cpus)
        self.restarts = 0
        self.events: list[str] = []  # human-readable restart log
        self._procs: list[Any] = [None] * len(self.jobs)
        self._started_at = [0.0] * len(self.jobs)
        self._seq = 0
        self._sync_outputs: list[tuple[int, dict[str, Tensor]] | None] = [None] * len(self.jobs)
        self._sync_snapshots: list[tuple[int, dict[str, Tensor]] | None] = [None] * len(self.jobs)
        self._sync_iterations = [0] * len(self.jobs)
        if mode == "async":
            self._inputs = [shared_tensors(job.inputs) for job in self.jobs]
            self._slots = [
                [shared_tensors(job.outputs), shared_tensors(job.outputs)] for job in self.jobs
            ]
            self._control = [
                torch.zeros(CONTROL_SIZE, dtype=torch.float64).share_memory_() for _ in self.jobs
            ]
            for control in self._control:
                control[OUT_VERSION : OUT_VERSION + 2] = -1.0
            self._views = [control.numpy() for control in self._control]

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> WorkerPool:
        """Spawn the worker processes (nothing in ``sync`` mode)."""
        if self.mode == "async":
            for j in range(len(self.jobs)):
                self._spawn(j)
        return self

    def _spawn(self, j: int) -> None:
        context = mp.get_context("spawn")
        self._views[j][HEARTBEAT] = time.time() + 60.0  # grace for the interpreter to start
        args = (
            self.jobs[j],
            self._inputs[j],
            self._slots[j],
            self._control[j],
            self.threads,
            self.poll_s,
            os.getpid(),
            self.cpus,
        )
        proc = context.Process(target=worker_main, args=args, daemon=True, name=f"worker-{j}")
        proc.start()
        self._procs[j] = proc
        self._started_at[j] = time.time()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and logs)."""
        return [p.pid for p in self._procs if p is not None and p.pid is not None]

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every worker: ask, wait ``timeout_s``, then kill; always reaps the processes."""
        if self.mode != "async":
            return
        for view in self._views:
            view[STOP] = 1.0
        deadline = time.time() + timeout_s
        for proc in self._procs:
            if proc is not None:
                proc.join(max(0.0, deadline - time.time()))
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                proc.close()
        self._procs = [None] * len(self.jobs)

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- health ---------------------------------------------------------------------------------

    def check(self) -> int:
        """Restart dead or stuck workers; returns how many were restarted now.

        Raises:
            WorkerFailure: more than ``max_restarts`` restarts in total.
        """
        if self.mode != "async":
            return 0
        restarted = 0
        now = time.time()
        for j, proc in enumerate(self._procs):
            dead = proc is None or proc.exitcode is not None
            stuck = not dead and now - self._views[j][HEARTBEAT] > self.heartbeat_s
            if not (dead or stuck):
                continue
            why = "stuck" if stuck else f"exited with code {proc.exitcode if proc else None}"
            if self.restarts >= self.max_restarts:
                hint = f"; raise workers.heartbeat_s={self.heartbeat_s:g} if its jobs are slow"
                raise WorkerFailure(
                    f"{self.name} worker {j} {why}; it was restarted {self.restarts} times already "
                    f"(workers.max_restarts={self.max_restarts}): giving up{hint if stuck else ''}"
                )
            if proc is not None:
                if proc.is_alive():
                    proc.kill()
                proc.join()
                proc.close()
            view = self._views[j]
            for slot in (0, 1):  # a slot it died writing is torn: drop it
                if view[OUT_SEQ + slot] % 2 == 1:
                    view[OUT_SEQ + slot] += 1
                    view[OUT_VERSION + slot] = -1.0
            self.restarts += 1
            restarted += 1
            event = f"{self.name} worker {j} {why}; restart {self.restarts} of {self.max_restarts}"
            self.events.append(event)
            print(event, file=sys.stderr, flush=True)
            self._spawn(j)
        return restarted

    def utilisation(self) -> float:
        """Busy time over lifetime, averaged over the workers (0 in ``sync`` mode)."""
        if self.mode != "async" or not self.jobs:
            return 0.0
        now = time.time()
        shares = [
            float(view[BUSY_S]) / max(now - start, 1e-9)
            for view, start in zip(self._views, self._started_at, strict=True)
        ]
        return min(1.0, sum(shares) / len(shares))

    def errors(self) -> int:
        """Jobs whose function raised (their outputs were not written)."""
        return 0 if self.mode != "async" else int(sum(v[ERRORS] for v in self._views))

    # -- data -----------------------------------------------------------------------------------

    def publish(self, inputs: Mapping[str, Tensor], version: int) -> None:
        """Hand every worker a snapshot of ``inputs`` (its keys) stamped ``version``."""
        for j, job in enumerate(self.jobs):
            if self.mode == "sync" and job.repeat:  # computed by run_once, on a copy
                snapshot = {k: inputs[k].detach().clone() for k in job.inputs}
                self._sync_snapshots[j] = (version, snapshot)
                continue
            if self.mode == "sync":
                snapshot = {k: inputs[k] for k in job.inputs}
                self._sync_outputs[j] = (version, job.fn(snapshot, job.options))
                continue
            view = self._views[j]
            view[IN_SEQ] += 1  # odd: being written
            for key, tensor in self._inputs[j].items():
                tensor.copy_(inputs[key])
            view[IN_VERSION] = version
            view[IN_SEQ] += 1

    def run_once(self, j: int) -> None:
        """``sync`` mode, repeating job ``j``: one iteration on the newest snapshot, now, in this
        process (what a worker process does continuously in ``async`` mode)."""
        if self.mode != "sync" or not self.jobs[j].repeat:
            raise ValueError("run_once is for repeating jobs in sync mode")
        published = self._sync_snapshots[j]
        if published is None:
            return
        version, snapshot = published
        iteration = self._sync_iterations[j]
        options = {**self.jobs[j].options, "iteration": iteration, "version": version}
        self._sync_outputs[j] = (iteration + 1, self.jobs[j].fn(snapshot, options))
        self._sync_iterations[j] = iteration + 1

    def completed_version(self, j: int) -> int:
        """The version of worker ``j``'s newest completed output (-1: none yet)."""
        if self.mode == "sync":
            done = self._sync_outputs[j]
            return -1 if done is None else done[0]
        view = self._views[j]
        return int(max(view[OUT_VERSION], view[OUT_VERSION + 1]))

    def newest(self, j: int) -> tuple[int, dict[str, Tensor]] | None:
        """A copy of worker ``j``'s newest completed output and its version (``None``: none)."""
        if self.mode == "sync":
            return self._sync_outputs[j]
        view = self._views[j]
        while True:
            slot = 0 if view[OUT_VERSION] >= view[OUT_VERSION + 1] else 1
            seq, version = view[OUT_SEQ + slot], view[OUT_VERSION + slot]
            if version < 0:
                return None
            if seq % 2 == 1:
                time.sleep(self.poll_s / 4)
                continue
            copied = {k: _copy(t, pin=self.pin_memory) for k, t in self._slots[j][slot].items()}
            if view[OUT_SEQ + slot] == seq and view[OUT_VERSION + slot] == version:
                return int(version), copied

    def wait(self, j: int, version: int, *, timeout_s: float) -> bool:
        """Block until worker ``j`` completed ``version`` (or newer); ``False`` on timeout.

        Restarts workers that die meanwhile (see :meth:`check`).
        """
        deadline = time.time() + timeout_s
        while self.completed_version(j) < version:
            if time.time() > deadline:
                return False
            self.check()
            time.sleep(self.poll_s / 2)
        return True

    def compute_inline(self, j: int, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Worker ``j``'s function run in this process (the fallback after a timed-out wait)."""
        job = self.jobs[j]
        return job.fn({k: inputs[k] for k in job.inputs}, job.options)
