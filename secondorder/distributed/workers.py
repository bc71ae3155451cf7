"""Asynchronous worker processes: a generic executor of pure functions over shared tensors.

Ba, Grosse & Martens 2017, "Distributed Second-Order Optimization using Kronecker-Factored
Approximations", section 5: curvature changes slowly, so the factor inversions can run
asynchronously on CPUs while the training ranks go on with the newest completed result. This
module is the "how" of that: it knows nothing of K-FAC (``distributed/`` never imports
``optim/``). An optimizer hands it :class:`Job` s — a module-level pure function
``fn(inputs, options) -> outputs`` with the shapes of its tensors — and then:

- ``publish(inputs, version)`` copies a snapshot into each worker's shared input slot (a
  sequence lock: odd while being written, so a worker never reads a torn snapshot);
- each worker (a ``spawn``-started process, ``torch.set_num_threads(threads)``) computes on the
  newest snapshot only and writes into one of TWO shared output slots, the one not holding its
  newest result, stamped with the snapshot's version (again under a sequence lock);
- ``newest(j)`` copies worker ``j``'s newest completed output; ``wait(j, version)`` blocks until
  that version is done (bounded by a timeout, then the caller computes in-process).

Every shared tensor is created with ``share_memory_()`` BEFORE the processes are spawned and is
passed at start; torch's ``file_descriptor`` strategy unlinks the ``/dev/shm`` file at creation,
so nothing is left behind even if the trainer is killed. Workers die with their parent
(``PR_SET_PDEATHSIG`` where available, plus a parent-pid check every poll).

Health: every worker stamps a heartbeat each poll and between jobs. :meth:`WorkerPool.check`
restarts a worker that exited or whose heartbeat is older than ``heartbeat_s`` (stuck), up to
``max_restarts`` restarts in total; beyond that it raises :class:`WorkerFailure`. The caller
keeps using its last good outputs meanwhile.

``mode="sync"``: no processes; ``publish`` runs the functions in-process at once (deterministic,
for tests and reproducibility). ``mode="async"`` with waits at every publish gives the same
numbers (on CPU, same threads).

Lifecycle from the entry point: ``with curvature_workers(optimizer, settings): trainer.fit()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.multiprocessing as mp
from torch import Tensor

__all__ = [
    "InversionSettings",
    "Job",
    "StatsSettings",
    "WorkerFailure",
    "WorkerPool",
    "WorkersSettings",
    "curvature_workers",
    "to_device",
]

Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
PureFunction = Callable[[dict[str, Tensor], dict[str, Any]], dict[str, Tensor]]

# Layout of each worker's shared float64 control vector (integers are exact below 2**53).
_IN_SEQ, _IN_VERSION, _OUT_SEQ, _OUT_VERSION = 0, 1, 2, 4  # _OUT_*: two entries, one per slot
_HEARTBEAT, _BUSY_S, _STOP, _ERRORS, _ITERATION = 6, 7, 8, 9, 10
_CONTROL_SIZE = 11


class WorkerFailure(RuntimeError):
    """A worker died (or got stuck) more often than ``max_restarts`` allows."""


@dataclass
class InversionSettings:
    """``num_processes`` inversion processes per rank, ``threads`` torch threads each."""

    num_processes: int = 1
    threads: int = 1


@dataclass
class StatsSettings:
    """Statistics workers (``num_processes = 0``: the training step computes the factors).

    Each of the ``num_processes`` processes per rank (``threads`` torch threads each) holds a
    model replica whose parameters are refreshed from the rank every ``refresh_every`` steps,
    and computes factor statistics on its own mini-batches of ``batch_size`` examples.
    """

    num_processes: int = 0
    refresh_every: int = 10
    batch_size: int = 128
    threads: int = 1


@dataclass
class WorkersSettings:
    """The ``workers`` config group: ``mode`` none | sync | async and the pools' sizes.

    ``max_staleness``: steps the training rank may run before the inverses of the newest
    published factors are in use (0: wait at once, equal to ``sync``). ``heartbeat_s``: a
    worker silent for longer is stuck (it must exceed the longest single job).
    ``wait_timeout_s``: the longest wait for a worker before computing in-process.
    ``cpus``: CPU ids every worker process is bound to (e.g. cores the training process and
    the data loaders leave free); ``None``: no binding.
    """

    mode: Literal["none", "sync", "async"] = "none"
    inversion: InversionSettings = field(default_factory=InversionSettings)
    stats: StatsSettings = field(default_factory=StatsSettings)
    max_staleness: int = 10
    max_restarts: int = 3
    heartbeat_s: float = 30.0
    wait_timeout_s: float = 120.0
    cpus: list[int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("none", "sync", "async"):
            raise ValueError(f"Invalid workers.mode: {self.mode!r} (none | sync | async)")
        checks = {
            "workers.inversion.num_processes": (self.inversion.num_processes, 1),
            "workers.inversion.threads": (self.inversion.threads, 1),
            "workers.stats.num_processes": (self.stats.num_processes, 0),
            "workers.stats.refresh_every": (self.stats.refresh_every, 1),
            "workers.stats.batch_size": (self.stats.batch_size, 1),
            "workers.stats.threads": (self.stats.threads, 1),
            "workers.max_staleness": (self.max_staleness, 0),
            "workers.max_restarts": (self.max_restarts, 0),
        }
        for key, (value, low) in checks.items():
            if value < low:
                raise ValueError(f"Invalid {key}: {value} (must be at least {low})")
        for key, value in (("heartbeat_s", self.heartbeat_s), ("wait_timeout_s",
                                                                self.wait_timeout_s)):  # fmt: skip
            if not value > 0:
                raise ValueError(f"Invalid workers.{key}: {value} (must be positive)")
        if self.cpus is not None:
            self.cpus = [int(c) for c in self.cpus]
            available = _available_cpus()
            if not self.cpus or (available is not None and not set(self.cpus) <= available):
                raise ValueError(
                    f"Invalid workers.cpus: {self.cpus} (a non-empty list of this machine's "
                    f"CPUs: {sorted(available) if available is not None else 'any'}; or null)"
                )


def _available_cpus() -> set[int] | None:
    getter = getattr(os, "sched_getaffinity", None)
    return None if getter is None else set(getter(0))


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


def _shared(spec: Spec) -> dict[str, Tensor]:
    return {key: torch.zeros(shape, dtype=dtype).share_memory_()
            for key, (shape, dtype) in spec.items()}  # fmt: skip


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # Linux only; the parent-pid check covers the rest
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(
    job: Job,
    inputs: dict[str, Tensor],
    slots: list[dict[str, Tensor]],
    control: Tensor,
    threads: int,
    poll_s: float,
    parent: int,
    cpus: list[int] | None = None,
) -> None:
    """The loop of one worker process: newest snapshot → ``job.fn`` → the older output slot."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the trainer, which stops us
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    c = control.numpy()
    done = -1.0
    while c[_STOP] == 0 and os.getppid() == parent:
        c[_HEARTBEAT] = time.time()
        seq = c[_IN_SEQ]
        if (seq == done and not job.repeat) or seq % 2 == 1 or seq == 0:
            time.sleep(poll_s)
            continue
        version = c[_IN_VERSION]
        snapshot = {k: t.clone() for k, t in inputs.items()}
        if c[_IN_SEQ] != seq:  # the trainer wrote meanwhile: read again
            continue
        start = time.perf_counter()
        options, stamp = job.options, version
        if job.repeat:
            iteration = int(c[_ITERATION])
            options = {**job.options, "iteration": iteration, "version": int(version)}
            stamp = iteration + 1
        try:
            outputs = job.fn(snapshot, options)
        except Exception:  # noqa: BLE001 - counted; the trainer keeps its last good outputs
            traceback.print_exc()
            c[_ERRORS] += 1
            done = seq
            if job.repeat:  # a repeating job moves on to the next draw
                c[_ITERATION] += 1
                time.sleep(poll_s)
            continue
        slot = 0 if c[_OUT_VERSION] <= c[_OUT_VERSION + 1] else 1
        c[_OUT_SEQ + slot] += 1  # odd: being written
        for key, tensor in slots[slot].items():
            tensor.copy_(outputs[key])
        c[_OUT_VERSION + slot] = stamp
        if job.repeat:
            c[_ITERATION] += 1
        c[_OUT_SEQ + slot] += 1
        c[_BUSY_S] += time.perf_counter() - start
        c[_HEARTBEAT] = time.time()
        done = seq


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
            self._inputs = [_shared(job.inputs) for job in self.jobs]
            self._slots = [[_shared(job.outputs), _shared(job.outputs)] for job in self.jobs]
            self._control = [torch.zeros(_CONTROL_SIZE, dtype=torch.float64).share_memory_()
                             for _ in self.jobs]  # fmt: skip
            for control in self._control:
                control[_OUT_VERSION : _OUT_VERSION + 2] = -1.0
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
        self._views[j][_HEARTBEAT] = time.time() + 60.0  # grace for the interpreter to start
        args = (self.jobs[j], self._inputs[j], self._slots[j], self._control[j], self.threads,
                self.poll_s, os.getpid(), self.cpus)  # fmt: skip
        proc = context.Process(target=_worker_main, args=args, daemon=True, name=f"worker-{j}")
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
            view[_STOP] = 1.0
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
            stuck = not dead and now - self._views[j][_HEARTBEAT] > self.heartbeat_s
            if not (dead or stuck):
                continue
            why = "stuck" if stuck else f"exited with code {proc.exitcode if proc else None}"
            if self.restarts >= self.max_restarts:
                raise WorkerFailure(
                    f"{self.name} worker {j} {why}; it was restarted {self.restarts} times already "
                    f"(workers.max_restarts={self.max_restarts}): giving up"
                )
            if proc is not None:
                if proc.is_alive():
                    proc.kill()
                proc.join()
                proc.close()
            view = self._views[j]
            for slot in (0, 1):  # a slot it died writing is torn: drop it
                if view[_OUT_SEQ + slot] % 2 == 1:
                    view[_OUT_SEQ + slot] += 1
                    view[_OUT_VERSION + slot] = -1.0
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
        shares = [float(view[_BUSY_S]) / max(now - start, 1e-9)
                  for view, start in zip(self._views, self._started_at, strict=True)]  # fmt: skip
        return min(1.0, sum(shares) / len(shares))

    def errors(self) -> int:
        """Jobs whose function raised (their outputs were not written)."""
        return 0 if self.mode != "async" else int(sum(v[_ERRORS] for v in self._views))

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
            view[_IN_SEQ] += 1  # odd: being written
            for key, tensor in self._inputs[j].items():
                tensor.copy_(inputs[key])
            view[_IN_VERSION] = version
            view[_IN_SEQ] += 1

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
        return int(max(view[_OUT_VERSION], view[_OUT_VERSION + 1]))

    def newest(self, j: int) -> tuple[int, dict[str, Tensor]] | None:
        """A copy of worker ``j``'s newest completed output and its version (``None``: none)."""
        if self.mode == "sync":
            return self._sync_outputs[j]
        view = self._views[j]
        while True:
            slot = 0 if view[_OUT_VERSION] >= view[_OUT_VERSION + 1] else 1
            seq, version = view[_OUT_SEQ + slot], view[_OUT_VERSION + slot]
            if version < 0:
                return None
            if seq % 2 == 1:
                time.sleep(self.poll_s / 4)
                continue
            copied = {k: _copy(t, pin=self.pin_memory) for k, t in self._slots[j][slot].items()}
            if view[_OUT_SEQ + slot] == seq and view[_OUT_VERSION + slot] == version:
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


@contextlib.contextmanager
def curvature_workers(
    optimizer: Any, settings: WorkersSettings | None, source: Any = None
) -> Iterator[Any]:
    """Start the optimizer's curvature workers for the ``with`` body and always stop them.

    ``settings.mode == "none"`` (or ``None``): nothing. Otherwise the optimizer must offer
    ``attach_workers(settings, source=source)`` (``source``: how statistics workers rebuild
    the model and data, passed through untouched) returning an object with ``close()`` (K-FAC
    does); its processes are stopped on normal exit, exceptions, Ctrl-C and SIGTERM (the
    trainer turns SIGTERM into a clean stop; a hard kill of the trainer takes the workers with
    it).
    """
    if settings is None or settings.mode == "none":
        yield None
        return
    attach = getattr(optimizer, "attach_workers", None)
    if attach is None:
        raise ValueError(
            f"workers.mode={settings.mode!r} needs an optimizer with curvature workers "
            f"(kfac, kfac_eigen, kfac_inverse); got {type(optimizer).__name__}"
        )
    handle = attach(settings, source=source)
    try:
        yield handle
    finally:
        handle.close()
