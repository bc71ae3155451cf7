"""The Horovod communicator: ``horovod.torch`` collectives behind the :class:`Communicator` API.

Launched by ``horovodrun`` (gloo controller on CPU, NCCL operations on GPUs when Horovod was
built with them)::

    horovodrun --gloo -np 2 -H localhost:2 python -m secondorder.train distributed=horovod ...
    launch/horovodrun.sh ...                     # the same, with hosts and overrides handled

Horovod 0.28.1 must be built for the installed torch: ``launch/install_horovod.sh`` (``make test``
runs it). It is imported lazily, so the rest of the package works without it.

Semantics match :class:`~secondorder.distributed.torch_comm.TorchComm` exactly: in-place
all-reduce (average or sum, optionally async with a ``wait()`` handle), in-place broadcast,
all-gather returning one tensor per rank in rank order, picklable-object broadcast and gather,
and a barrier. Every collective is counted in ``self.stats``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from secondorder.distributed.comm_stats import (
    STATS_ENV,
    CommStats,
    Timed,
    nbytes_of,
    pickled_size,
)
from secondorder.distributed.communicator import Communicator, Done, Op

INSTALL_HINT = "distributed=horovod needs Horovod: run launch/install_horovod.sh"


def import_horovod() -> Any:
    """``horovod.torch``, or an :class:`ImportError` saying how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return hvd


class HorovodComm(Communicator):
    """Horovod (``horovod.torch``) collectives.

    Args:
        device: the device tensors live on; CUDA tensors need Horovod built with NCCL
            operations (``launch/install_horovod.sh`` does that when torch has CUDA).
        timeout_s: how long a collective may stall before Horovod shuts down with an error
            (``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``) and the gloo timeout
            (``HOROVOD_GLOO_TIMEOUT_SECONDS``), unless those variables are already set.
    """

    backend = "horovod"

    def __init__(self, *, device: torch.device | None = None, timeout_s: float = 600.0):
        if timeout_s <= 0:
            raise ValueError(f"Invalid timeout_s: {timeout_s}")
        hvd = import_horovod()
        if device is not None and device.type == "cuda" and not hvd.nccl_built():
            raise RuntimeError(
                "distributed=horovod on CUDA needs Horovod built with NCCL operations: "
                "rerun launch/install_horovod.sh with a CUDA build of torch"
            )
        # Read by Horovod's core at init: a stalled collective fails instead of hanging.
        seconds = str(max(1, int(timeout_s)))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", seconds)
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, int(timeout_s) // 2)))
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", seconds)
        hvd.init()
        self._hvd = hvd
        self._rank, self._world, self._local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self.stats = CommStats(intervals=bool(os.environ.get(STATS_ENV)))

    def all_reduce(self, tensor: torch.Tensor, *, op: Op = "avg", async_op: bool = False):
        if self._world == 1:
            return Done() if async_op else None
        hvd = self._hvd
        start = time.perf_counter()
        handle = hvd.allreduce_async_(tensor, op=hvd.Average if op == "avg" else hvd.Sum)
        self.stats.record(
            "all_reduce", nbytes=nbytes_of(tensor), seconds=time.perf_counter() - start
        )
        timed = Timed(lambda: hvd.synchronize(handle), self.stats, "all_reduce")
        if async_op:
            return timed
        timed.wait()
        return None

    def broadcast(self, tensor: torch.Tensor, *, src: int = 0, async_op: bool = False):
        if self._world == 1:
            return Done() if async_op else None
        hvd = self._hvd
        start = time.perf_counter()
        handle = hvd.broadcast_async_(tensor, root_rank=src)
        self.stats.record(
            "broadcast", nbytes=nbytes_of(tensor), seconds=time.perf_counter() - start
        )
        timed = Timed(lambda: hvd.synchronize(handle), self.stats, "broadcast")
        if async_op:
            return timed
        timed.wait()
        return None

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self._world == 1:
            return [tensor.clone()]
        start = time.perf_counter()
        # Horovod concatenates along dim 0: gather one leading slot per rank, then split.
        stacked = self._hvd.allgather(tensor.contiguous().unsqueeze(0))
        self.stats.record(
            "all_gather", nbytes=nbytes_of(tensor), seconds=time.perf_counter() - start
        )
        return list(stacked.unbind(0))

    def broadcast_object(self, obj: Any, *, src: int = 0) -> Any:
        if self._world == 1:
            return obj
        start = time.perf_counter()
        # Horovod matches a collective across ranks by name, and its default name is the
        # object's type: a rank sending a str while the others pass None would wait forever.
        out = self._hvd.broadcast_object(obj, root_rank=src, name="broadcast_object")
        self.stats.record("object", nbytes=pickled_size(out), seconds=time.perf_counter() - start)
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self._world == 1:
            return [obj]
        start = time.perf_counter()
        out = self._hvd.allgather_object(obj, name="all_gather_object")  # not by type, as above
        self.stats.record("object", nbytes=pickled_size(obj), seconds=time.perf_counter() - start)
        return list(out)

    def barrier(self) -> None:
        if self._world == 1:
            return
        start = time.perf_counter()
        self._hvd.barrier()
        self.stats.record("all_reduce", seconds=time.perf_counter() - start)

    def shutdown(self) -> None:
        self.dump_stats()
        # Horovod's own atexit hook shuts the background thread down; shutting it down here
        # too early would break a caller that still holds this communicator.
