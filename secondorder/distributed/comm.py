"""Communicators: the only place that talks to ``torch.distributed`` and Horovod.

Optimizers and the trainer receive a :class:`Communicator` and call its methods; they never call
collective libraries themselves. ``NoComm`` is world size 1 with every collective a no-op, so
library code written against the interface runs unchanged in a plain single-process loop.

Launch commands this module serves::

    python -m secondorder.train distributed=none ...
    torchrun --standalone --nproc_per_node=2 -m secondorder.train distributed=torch ...
    horovodrun --gloo -np 2 -H localhost:2 python -m secondorder.train distributed=horovod ...

Every backend counts what it communicates in ``comm.stats`` (:class:`CommStats`: calls, payload
bytes and seconds spent in collectives, per kind), which the parallel-efficiency tool reads.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from secondorder.distributed.comm_stats import (
    STATS_ENV,
    CommStats,
    Timed,
    nbytes_of,
    parameter_fingerprint,
    pickled_size,
)

Op = Literal["avg", "sum"]


class Handle(Protocol):
    """What an asynchronous collective returns: ``wait()`` blocks until the result is in place."""

    def wait(self) -> Any: ...


class _Done:
    """A handle for work that already finished (single process, or a synchronous fallback)."""

    def wait(self) -> None:
        return None


class Communicator:
    """Interface every backend implements. World size 1 semantics are the default bodies."""

    backend: str = "none"
    stats: CommStats = CommStats()  # replaced per instance by backends that communicate
    # Backends set these from their launcher; the defaults are one process.
    _rank: int = 0
    _local_rank: int = 0
    _world: int = 1

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, *, op: Op = "avg", async_op: bool = False):
        """Reduce ``tensor`` in place across ranks; returns a handle when ``async_op``."""
        return _Done() if async_op else None

    def broadcast(self, tensor: torch.Tensor, *, src: int = 0, async_op: bool = False):
        """Copy ``src``'s tensor into every rank's ``tensor`` in place."""
        return _Done() if async_op else None

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor``, in rank order."""
        return [tensor.clone()]

    def broadcast_object(self, obj: Any, *, src: int = 0) -> Any:
        """A picklable object from ``src`` on every rank."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order."""
        return [obj]

    def barrier(self) -> None:
        return None

    def all_reduce_tensors(
        self, tensors: Sequence[torch.Tensor], *, op: Op = "avg", bucket_mb: float = 25.0
    ) -> None:
        """All-reduce many tensors in place, packed into flat buckets of about ``bucket_mb``.

        One collective per bucket instead of one per tensor; tensors of different dtypes or
        devices go to different buckets.
        """
        if self.world_size == 1:
            return
        bucket_bytes = int(bucket_mb * 2**20)
        pending: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []
        for bucket in _buckets(tensors, bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            pending.append((self.all_reduce(flat, op=op, async_op=True), flat, bucket))
        for handle, flat, bucket in pending:
            handle.wait()
            offset = 0
            for t in bucket:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    def all_reduce_gradients(self, params: Iterable[torch.Tensor], *, bucket_mb: float = 25.0):
        """Average ``p.grad`` over ranks for every parameter that has one."""
        self.stats.begin_interval()
        grads = [p.grad for p in params if p.grad is not None]
        self.all_reduce_tensors(grads, op="avg", bucket_mb=bucket_mb)

    def broadcast_parameters(self, tensors: Iterable[torch.Tensor], *, src: int = 0) -> None:
        """Make every rank start from ``src``'s values (parameters and buffers)."""
        if self.world_size == 1:
            return
        handles = [self.broadcast(t.data, src=src, async_op=True) for t in tensors]
        for h in handles:
            h.wait()

    def verify_parameters(self, tensors: Iterable[torch.Tensor], *, step: int = -1) -> None:
        """Fail loudly when ranks hold different parameters (``distributed.verify_every``).

        Every rank gathers a float64 fingerprint of its tensors (per tensor: the sum and the sum
        weighted by position, so a swap or a single changed element shows) and compares it with
        rank 0's bitwise: data-parallel ranks apply identical updates to identical weights.
        One host synchronisation per call.
        """
        if self.world_size == 1:
            return
        fingerprint = parameter_fingerprint(tensors)
        gathered = self.all_gather(fingerprint)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, gathered[0]):
                diff = (other - gathered[0]).abs().max().item()
                raise ParameterDivergence(
                    f"parameters differ between rank 0 and rank {rank}"
                    + (f" at step {step}" if step >= 0 else "")
                    + f" (largest fingerprint difference {diff:.3g}); the ranks no longer "
                    "train the same model"
                )

    def dump_stats(self) -> None:
        """Write ``comm_stats.rank<r>.json`` into ``$SECONDORDER_COMM_STATS`` when it is set."""
        folder = os.environ.get(STATS_ENV)
        if not folder or self.world_size == 1:
            return
        os.makedirs(folder, exist_ok=True)
        record = {"backend": self.backend, "rank": self.rank, "world_size": self.world_size}
        record.update(self.stats.as_dict())
        path = os.path.join(folder, f"comm_stats.rank{self.rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    def shutdown(self) -> None:
        return None


class ParameterDivergence(RuntimeError):
    """Ranks of a data-parallel run hold different parameters."""


class NoComm(Communicator):
    """World size 1; every collective is a no-op and no process group exists."""

    backend = "none"


class TorchComm(Communicator):
    """``torch.distributed`` with NCCL when CUDA is used, gloo otherwise.

    Initialised from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``). If a process group already exists it is reused.
    """

    backend = "torch"

    def __init__(self, *, device: torch.device | None = None, timeout_s: float = 600.0):
        self._owns_group = False
        if not dist.is_initialized():
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise RuntimeError(
                    "distributed=torch needs the torchrun environment (RANK, WORLD_SIZE, "
                    "MASTER_ADDR, MASTER_PORT); launch with `torchrun ...` or use distributed=none"
                )
            use_cuda = device is not None and device.type == "cuda"
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=device if use_cuda else None,
                **_elastic_store(timeout_s),
            )
            self._owns_group = True
        self._rank = dist.get_rank()
        self._world = dist.get_world_size()
        self._local_rank = int(os.environ.get("LOCAL_RANK", self._rank))
        self.stats = CommStats(intervals=bool(os.environ.get(STATS_ENV)))

    def all_reduce(self, tensor: torch.Tensor, *, op: Op = "avg", async_op: bool = False):
        if self._world == 1:
            return _Done() if async_op else None
        start = time.perf_counter()
        # gloo has no AVG reduction: sum, then scale once the result is in.
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
        scaled = _Scaled(work, tensor, 1.0 / self._world if op == "avg" else None)
        self.stats.record(
            "all_reduce", nbytes=nbytes_of(tensor), seconds=time.perf_counter() - start
        )
        handle = Timed(scaled.wait, self.stats, "all_reduce")
        if async_op:
            return handle
        handle.wait()
        return None

    def broadcast(self, tensor: torch.Tensor, *, src: int = 0, async_op: bool = False):
        if self._world == 1:
            return _Done() if async_op else None
        start = time.perf_counter()
        work = dist.broadcast(tensor, src=src, async_op=True)
        self.stats.record(
            "broadcast", nbytes=nbytes_of(tensor), seconds=time.perf_counter() - start
        )
        handle = Timed(work.wait, self.stats, "broadcast")
        if async_op:
            return handle
        handle.wait()
        return None

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        start = time.perf_counter()
        out = [torch.empty_like(tensor) for _ in range(self._world)]
        dist.all_gather(out, tensor.contiguous())
        self.stats.record(
            "all_gather", nbytes=nbytes_of(tensor), seconds=time.perf_counter() - start
        )
        return out

    def broadcast_object(self, obj: Any, *, src: int = 0) -> Any:
        start = time.perf_counter()
        box = [obj if self._rank == src else None]
        dist.broadcast_object_list(box, src=src)
        self.stats.record(
            "object", nbytes=pickled_size(box[0]), seconds=time.perf_counter() - start
        )
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        start = time.perf_counter()
        out: list[Any] = [None] * self._world
        dist.all_gather_object(out, obj)
        self.stats.record("object", nbytes=pickled_size(obj), seconds=time.perf_counter() - start)
        return out

    def barrier(self) -> None:
        start = time.perf_counter()
        dist.barrier()
        self.stats.record("all_reduce", seconds=time.perf_counter() - start)

    def shutdown(self) -> None:
        self.dump_stats()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


def _elastic_store(timeout_s: float) -> dict[str, Any]:
    """A store private to this torchrun restart round (``{}`` outside torchrun restarts).

    torchrun keeps one agent store across the restarts of ``--max-restarts``; without a prefix a
    restarted rank can read a dead rank's gloo address left from the previous round and fail to
    connect. Prefixing the keys with ``TORCHELASTIC_RESTART_COUNT`` keeps rounds apart.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        return {}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_hosts_store and rank == 0,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    prefixed = dist.PrefixStore(f"secondorder/restart_{restart}", store)
    return {"store": prefixed, "rank": rank, "world_size": world}


class _Scaled:
    """Wraps an async all-reduce so ``wait()`` also applies the averaging scale."""

    def __init__(self, work: Any, tensor: torch.Tensor, scale: float | None):
        self._work, self._tensor, self._scale = work, tensor, scale

    def wait(self) -> None:
        self._work.wait()
        if self._scale is not None:
            self._tensor.mul_(self._scale)
            self._scale = None


def _buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    for t in tensors:
        key = (t.dtype, t.device)
        lists = groups.setdefault(key, [[]])
        current = lists[-1]
        size = sum(x.numel() * x.element_size() for x in current)
        if current and size + t.numel() * t.element_size() > bucket_bytes:
            current = []
            lists.append(current)
        current.append(t)
    return [b for lists in groups.values() for b in lists if b]


Backend = Literal["auto", "none", "torch", "horovod"]


def launcher_env(environ: Any = None) -> dict[str, Any]:
    """Which launcher started this process, and the rank layout it set in the environment.

    ``launcher`` is ``horovod`` under ``horovodrun`` (``HOROVOD_RANK``) or Open MPI's ``mpirun``
    (``OMPI_COMM_WORLD_RANK``), ``torch`` under ``torchrun`` (``WORLD_SIZE``), else ``none``;
    ``rank``, ``local_rank`` and ``world_size`` come from that launcher's variables.
    """
    env = os.environ if environ is None else environ

    def read(*names: str, default: int) -> int:
        for name in names:
            if name in env:
                return int(env[name])
        return default

    if "HOROVOD_RANK" in env or "OMPI_COMM_WORLD_RANK" in env:
        return {
            "launcher": "horovod",
            "rank": read("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", default=0),
            "local_rank": read("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            "world_size": read("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", default=1),
        }
    if "WORLD_SIZE" in env:
        return {
            "launcher": "torch",
            "rank": read("RANK", default=0),
            "local_rank": read("LOCAL_RANK", default=0),
            "world_size": read("WORLD_SIZE", default=1),
        }
    return {"launcher": "none", "rank": 0, "local_rank": 0, "world_size": 1}


def build_communicator(
    backend: Backend,
    *,
    device: torch.device | None = None,
    timeout_s: float = 600.0,
) -> Communicator:
    """The one place a backend is chosen.

    ``auto`` picks ``horovod`` when launched by horovodrun (``HOROVOD_RANK`` or
    ``OMPI_COMM_WORLD_RANK`` set), ``torch`` when launched by torchrun (``WORLD_SIZE`` set) and
    ``none`` otherwise (see :func:`launcher_env`).
    """
    if backend == "auto":
        backend = launcher_env()["launcher"]
    match backend:
        case "none":
            return NoComm()
        case "torch":
            return TorchComm(device=device, timeout_s=timeout_s)
        case "horovod":
            from secondorder.distributed.horovod_comm import HorovodComm

            return HorovodComm(device=device, timeout_s=timeout_s)
        case _:
            raise ValueError(
                f"Unknown distributed backend {backend!r}; choose auto, none, torch, horovod"
            )
