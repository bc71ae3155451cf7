"""Run a function on N spawned CPU ranks with a hang timeout (for tests and quick checks).

    results = run_on_ranks(fn, world_size=2, args=(x,), timeout_s=60)

Each rank is a fresh process (``spawn``, never ``fork``) with a gloo process group, one torch
thread, and ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set like torchrun does. ``fn`` must be a
module-level function. A rank that raises makes the call raise with that rank's traceback; a rank
that hangs (a collective nobody else joins) makes it raise :class:`TimeoutError` after
``timeout_s``, with every rank killed — a broken collective fails a test instead of freezing it.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    results: Any,
    init_group: bool,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        if init_group:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # Plain pickle: torch's queue reductions would pass tensors as shared-memory handles
        # that die with this process.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        if init_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    *,
    world_size: int,
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
    init_group: bool = True,
) -> list[Any]:
    """``fn(*args)`` on ``world_size`` spawned ranks; returns the per-rank results in rank order.

    Args:
        fn: a picklable (module-level) function.
        world_size: number of ranks.
        args: positional arguments, pickled to every rank.
        timeout_s: the whole run's limit.
        init_group: create the gloo process group before calling ``fn`` (``False`` leaves that
            to ``fn``, e.g. to test the communicator's own initialisation).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, fn, args, results, init_group),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"ranks {sorted(set(range(world_size)) - set(outcome))} did not finish "
                    f"within {timeout_s}s (hung collective?)"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                missing = [r for r in dead if r not in outcome]
                if missing:
                    raise RuntimeError(
                        f"rank {missing[0]} died with exit code {procs[missing[0]].exitcode}"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} raised:\n{value}")
            outcome[rank] = (ok, pickle.loads(value))
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcome) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [outcome[r][1] for r in range(world_size)]
