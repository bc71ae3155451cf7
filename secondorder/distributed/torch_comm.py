"""``torch.distributed`` behind the :class:`~.communicator.Communicator` API (NCCL or gloo).

Launched by torchrun::

    torchrun --standalone --nproc_per_node=2 -m secondorder.train distributed=torch ...

Every collective is counted in ``self.stats``.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from secondorder.distributed.comm_stats import (
    STATS_ENV,
    CommStats,
    Timed,
    nbytes_of,
    pickled_size,
)
from secondorder.distributed.communicator import Communicator, Done, Op

__all__ = ["TorchComm"]


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
            return Done() if async_op else None
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
            return Done() if async_op else None
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
