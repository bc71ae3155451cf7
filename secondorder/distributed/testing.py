"""Run a function on N spawned CPU ranks with a hang timeout (for tests and quick checks).

    results = run_on_ranks(fn, world_size=2, args=(x,), timeout_s=60)

Each rank is a fresh process (``spawn``, never ``fork``) with a gloo process group, one torch
thread, and ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set like torchrun does. ``fn`` must be a
module-level function. A rank that raises makes the call raise with that rank's traceback; a rank
that hangs (a collective nobody else joins) makes it raise :class:`TimeoutError` after
``timeout_s``, with every rank killed — a broken collective fails a test instead of freezing it.

:func:`run_on_horovod_ranks` does the same with ranks started by ``horovodrun --gloo`` (Horovod
built by ``launch/install_horovod.sh``), so one test body runs under both backends::

    results = run_on_horovod_ranks(fn, world_size=2, args=(x,), timeout_s=60)
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
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
    outcome: dict[int, Any] = {}
    try:
        _collect(results, procs, outcome, timeout_s=timeout_s)
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcome) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [outcome[r] for r in range(world_size)]


def _collect(results: Any, procs: list[Any], outcome: dict[int, Any], *, timeout_s: float) -> None:
    """Fill ``outcome`` (rank -> result) from the ranks' queue; raise for a rank that raised or
    died, and after ``timeout_s``."""
    world_size = len(procs)
    deadline = time.monotonic() + timeout_s
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
        outcome[rank] = pickle.loads(value)


# -- the same under Horovod --------------------------------------------------------------------


def horovodrun_path() -> str | None:
    """``horovodrun`` next to this Python, else on ``PATH``; ``None`` when Horovod is missing."""
    beside = Path(sys.executable).with_name("horovodrun")
    if beside.exists():
        return str(beside)
    return shutil.which("horovodrun")


def run_on_horovod_ranks(
    fn: Callable[..., Any],
    *,
    world_size: int,
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
) -> list[Any]:
    """``fn(*args)`` on ``world_size`` ranks started by ``horovodrun --gloo``; per-rank results.

    The Horovod counterpart of :func:`run_on_ranks`: ``fn`` (module-level, picklable) runs in
    every rank with Horovod's environment set and no process group; it builds its communicator
    (``build_communicator("auto")`` picks Horovod there). A rank that raises makes the call raise
    with that rank's traceback; past ``timeout_s`` every process is killed and
    :class:`TimeoutError` is raised.
    """
    horovodrun = horovodrun_path()
    if horovodrun is None:
        raise RuntimeError("horovodrun not found: run launch/install_horovod.sh")
    with tempfile.TemporaryDirectory(prefix="horovod-ranks-") as tmp:
        job = Path(tmp) / "job.pkl"
        job.write_bytes(pickle.dumps((fn, tuple(args))))
        cmd = [horovodrun, "--gloo", "-np", str(world_size), "-H", f"localhost:{world_size}"]
        cmd += [sys.executable, "-m", "secondorder.distributed.testing", str(job), tmp]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        # The parent's import path, so ``fn``'s module (a test file, say) imports in the ranks.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(max(1, int(timeout_s))))
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_process_tree(proc.pid)
            proc.communicate()
            raise TimeoutError(
                f"horovodrun with {world_size} ranks did not finish within {timeout_s}s "
                "(hung collective?)"
            ) from None
        return _horovod_results(Path(tmp), world_size, proc.returncode, output)


def _horovod_results(tmp: Path, world_size: int, returncode: int, output: str) -> list[Any]:
    """The ranks' saved results, or the error of the first rank that failed."""
    outcome: dict[int, tuple[bool, Any, float]] = {}
    for rank in range(world_size):
        path = tmp / f"result.rank{rank}.pkl"
        if path.exists():
            outcome[rank] = pickle.loads(path.read_bytes())
    # The first rank to fail is the cause; the others usually fail because Horovod shut down.
    failed = sorted((when, rank, value) for rank, (ok, value, when) in outcome.items() if not ok)
    if failed:
        _, rank, value = failed[0]
        others = ", ".join(str(r) for _, r, _ in failed[1:])
        raise RuntimeError(
            f"rank {rank} raised:\n{value}"
            + (f"\n(then ranks {others} failed too)" if others else "")
        )
    missing = [r for r in range(world_size) if r not in outcome]
    if returncode != 0 or missing:
        raise RuntimeError(
            f"horovodrun exited with {returncode}; ranks without a result: {missing}\n"
            f"{output[-4000:]}"
        )
    return [outcome[r][1] for r in range(world_size)]


def kill_process_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (Linux ``/proc``), then its process group."""
    victims = [pid]
    queue_ = [pid]
    while queue_:
        parent = queue_.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                victims.append(child)
                queue_.append(child)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _horovod_rank_main(job: str, out_dir: str) -> int:
    """Body of one rank under :func:`run_on_horovod_ranks`: run the pickled job, save the result."""
    torch.set_num_threads(1)
    rank = int(os.environ.get("HOROVOD_RANK", "0"))
    fn, args = pickle.loads(Path(job).read_bytes())
    try:
        result: tuple[bool, Any, float] = (True, fn(*args), time.time())
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        result, code = (False, traceback.format_exc(), time.time()), 1
    path = Path(out_dir) / f"result.rank{rank}.pkl"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(result))
    tmp.replace(path)
    if code:
        print(result[1], file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    # Exit without waiting for peers stuck in a collective: horovodrun then stops the rest.
    os._exit(_horovod_rank_main(sys.argv[1], sys.argv[2]))
