"""Communicators: which backend this process uses, chosen from the launcher that started it.

``distributed/`` is the only place that talks to ``torch.distributed`` and Horovod; optimizers
and the trainer receive a :class:`Communicator` and call its methods. The interface lives in
:mod:`.communicator`, the backends in :mod:`.torch_comm` and :mod:`.horovod_comm`; this module
only chooses among them (and re-exports them, the package's public names), so every backend
imports the interface and nothing imports back.

Launch commands this module serves::

    python -m secondorder.train distributed=none ...
    torchrun --standalone --nproc_per_node=2 -m secondorder.train distributed=torch ...
    horovodrun --gloo -np 2 -H localhost:2 python -m secondorder.train distributed=horovod ...

Every backend counts what it communicates in ``comm.stats`` (:class:`CommStats`: calls, payload
bytes and seconds spent in collectives, per kind), which the parallel-efficiency tool reads.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from secondorder.distributed.communicator import Communicator, NoComm, Op, ParameterDivergence
from secondorder.distributed.horovod_comm import HorovodComm
from secondorder.distributed.torch_comm import TorchComm

__all__ = [
    "Backend",
    "Communicator",
    "HorovodComm",
    "NoComm",
    "Op",
    "ParameterDivergence",
    "TorchComm",
    "build_communicator",
    "launcher_env",
]

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
            return HorovodComm(device=device, timeout_s=timeout_s)
        case _:
            raise ValueError(
                f"Unknown distributed backend {backend!r}; choose auto, none, torch, horovod"
            )
