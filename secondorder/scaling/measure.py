"""Measurement: one config run through the real entry point at several world sizes.

Every run is launched by torchrun (``--backend torch``) or ``horovodrun --gloo`` (``--backend
horovod``) with ``$SECONDORDER_COMM_STATS`` set, so each rank's communicator writes the
collectives it took part in (:mod:`secondorder.distributed.comm_stats`). Per world size N: the
step time T(N) over the steady steps of ``metrics.jsonl``; throughput = global batch / T(N);
communication = time the ranks spent blocked in collectives and the bytes they passed; compute =
forward + backward of one rank's micro-batches timed alone from the run's ``config.yaml``;
optimizer + other = the rest (update, curvature work, data loading). Parallel efficiency: weak
scaling (fixed per-rank batch) ``throughput(N) / (N * throughput(1))``, strong scaling (fixed
global batch) ``T(1) / (N T(N))``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from secondorder.scaling.project import projection
from secondorder.scaling.readers import no_traffic, step_seconds, step_traffic


def efficiency(rows: list[dict[str, Any]], scaling: Literal["weak", "strong"]) -> None:
    """Add ``efficiency`` to measured rows (needs the world-size-1 row)."""
    one = next((r for r in rows if r["world_size"] == 1), None)
    for r in rows:
        if one is None:
            r["efficiency"] = None
        elif scaling == "weak":
            r["efficiency"] = r["throughput"] / (r["world_size"] * one["throughput"])
        else:
            r["efficiency"] = one["step_s"] / (r["world_size"] * r["step_s"])


def compute_seconds(run_dir: Path, *, repeats: int = 20) -> float:
    """Forward + backward time of one rank's micro-batches, from the run's config.yaml.

    The fastest of ``repeats`` timings: on a shared machine the minimum is the compute itself,
    other processes only ever add to it.
    """
    import torch
    from omegaconf import OmegaConf

    from secondorder import build
    from secondorder.config import validate
    from secondorder.data.loader import make_step_loader
    from secondorder.optim.closure import BatchClosure

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = validate(OmegaConf.load(run_dir / "config.yaml"), world_size=summary["world_size"])
    build.setup_device(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build.build_data(cfg)
    model = build.build_model(cfg, device)
    task = build.build_task(cfg)
    sampler = build.build_sampler(cfg, len(data.train), world_size=summary["world_size"])
    normalization = getattr(data.train, "normalization", None)
    batches = [
        task.to_device(inputs, labels, device, normalization)
        for inputs, labels in make_step_loader(data.train, sampler, num_workers=0).batches(0)
    ]
    closure = BatchClosure(model=model, micro_batches=batches, loss_kind=cfg.model.loss)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        closure()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return min(times)


def _isolated_all_reduce(sizes: list[int], repeats: int) -> float:
    """On every rank: the median time of all-reducing float32 tensors of ``sizes`` bytes, with
    a barrier first so the ranks start together (the transfer alone, no waiting for a peer)."""
    import torch

    from secondorder.distributed import build_communicator

    comm = build_communicator("auto")
    tensors = [torch.zeros(max(1, n // 4)) for n in sizes]
    times = []
    for _ in range(repeats + 3):
        comm.barrier()
        start = time.perf_counter()
        for t in tensors:
            comm.all_reduce(t, op="sum")
        times.append(time.perf_counter() - start)
    comm.shutdown()
    return statistics.median(times[3:])


def isolated_comm_seconds(backend: str, world_size: int, sizes: list[int]) -> float:
    """How long this step's all-reduces take alone on ``world_size`` local ranks."""
    from secondorder.distributed import testing

    if backend == "torch":
        per_rank = testing.run_on_ranks(
            _isolated_all_reduce, world_size=world_size, args=(sizes, 50), init_group=False
        )
    else:
        per_rank = testing.run_on_horovod_ranks(
            _isolated_all_reduce, world_size=world_size, args=(sizes, 50)
        )
    return max(per_rank)


# -- launching runs ------------------------------------------------------------------------------


def launch_command(backend: str, world_size: int, overrides: list[str]) -> list[str]:
    """The command that runs the entry point on ``world_size`` local ranks with ``backend``."""
    if backend == "torch":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world_size}",
            "-m",
            "secondorder.train",
            "distributed=torch",
            *overrides,
        ]
    if backend == "horovod":
        from secondorder.distributed.testing import horovodrun_path

        horovodrun = horovodrun_path() or "horovodrun"
        return [
            horovodrun,
            "--gloo",
            "-np",
            str(world_size),
            "-H",
            f"localhost:{world_size}",
            sys.executable,
            "-m",
            "secondorder.train",
            "distributed=horovod",
            *overrides,
        ]
    raise ValueError(f"Unknown backend {backend!r}; choose torch or horovod")


def run_entry_point(
    command: list[str], *, stats_dir: Path, threads: int | None, timeout_s: float
) -> None:
    """Run ``command`` with the communicators' byte counts written to ``stats_dir``."""
    env = dict(os.environ, SECONDORDER_COMM_STATS=str(stats_dir), WANDB_MODE="disabled")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"run failed ({result.returncode}): {' '.join(command)}\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )


def run_overrides(args: argparse.Namespace, *, global_batch: int, run_dir: Path) -> list[str]:
    """The user's overrides plus what makes a clean timing run (no target, no mid-run eval)."""
    extra = [
        f"data.batch_size={global_batch}",
        f"trainer.max_steps={args.steps}",
        f"trainer.log_every={args.log_every}",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.target.metric=null",
        "trainer.target.value=null",
        "trainer.progress=false",
        f"trainer.run_dir={run_dir}",
        "logger=none",
    ]
    if args.threads is not None:
        extra.append(f"trainer.threads={args.threads}")
    return [*args.overrides, *extra]


# -- the measure and count commands --------------------------------------------------------------


def _batch_and_dir(args: argparse.Namespace, n: int) -> tuple[int, Path]:
    """The global batch and the run directory of world size ``n``."""
    global_batch = args.batch_per_rank * n if args.scaling == "weak" else args.global_batch
    return global_batch, (Path(args.runs_dir) / args.name / f"n{n}").resolve()


def measure_world_size(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """Run the entry point on ``n`` ranks and split its step time into the table's columns."""
    global_batch, run_dir = _batch_and_dir(args, n)
    command = launch_command(
        args.backend, n, run_overrides(args, global_batch=global_batch, run_dir=run_dir)
    )
    stats_dir = run_dir / "comm_stats"
    print(f"[scaling] N={n}: {' '.join(command)}", flush=True)
    run_entry_point(command, stats_dir=stats_dir, threads=args.threads, timeout_s=args.timeout)
    step_s, timed_steps = step_seconds(run_dir / "metrics.jsonl", warmup_steps=args.warmup)
    if n > 1:
        comm = step_traffic(stats_dir, n, warmup_steps=args.warmup)
        all_reduce = comm["traffic"]["all_reduce"]
        calls = max(1, round(all_reduce["calls"]))
        # The step's all-reduce bytes as one large message plus the small ones (loss, flags).
        sizes = [int(all_reduce["bytes"]) - 4 * (calls - 1)] + [4] * (calls - 1)
        comm["isolated_comm_s"] = isolated_comm_seconds(args.backend, n, sizes)
    else:
        comm = no_traffic()
    compute_s = compute_seconds(run_dir, repeats=args.compute_repeats)
    return {
        "world_size": n,
        "global_batch": global_batch,
        "per_rank_batch": global_batch // n,
        "timed_steps": timed_steps,
        "step_s": step_s,
        "throughput": global_batch / step_s,
        "compute_s": compute_s,
        "comm_s": comm["comm_s"],
        "isolated_comm_s": comm["isolated_comm_s"],
        "other_s": step_s - compute_s - comm["comm_s"],
        "bytes_per_step": comm["bytes_per_step"],
        "traffic": comm["traffic"],
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every world size through the entry point and collect the table rows (with
    ``--dry-run``: print the commands and return nothing)."""
    if args.dry_run:
        for n in args.world_sizes:
            global_batch, run_dir = _batch_and_dir(args, n)
            overrides = run_overrides(args, global_batch=global_batch, run_dir=run_dir)
            print(" ".join(launch_command(args.backend, n, overrides)))
        return {}
    rows = [measure_world_size(args, n) for n in args.world_sizes]
    efficiency(rows, args.scaling)
    result = {
        "kind": "measured",
        "name": args.name,
        "backend": args.backend,
        "scaling": args.scaling,
        "overrides": args.overrides,
        "command": args.command,
        "host": {
            "cpus": os.cpu_count(),
            "threads_per_rank": args.threads,
            "load_average_1m_at_end": os.getloadavg()[0],  # other processes sharing the CPUs
        },
        "rows": rows,
    }
    largest = max(rows, key=lambda r: r["world_size"])
    if largest["world_size"] > 1:
        one = next(r for r in rows if r["world_size"] == 1) if rows[0]["world_size"] == 1 else None
        optimizer_s = one["other_s"] if one else largest["other_s"]
        result["projection"] = projection(
            args,
            compute_s=largest["compute_s"],
            optimizer_s=optimizer_s,
            traffic=largest["traffic"],
        )
    return result


def count_traffic(args: argparse.Namespace) -> dict[str, Any]:
    """Bytes per step of a tiny 2-rank run of the same model and optimizer (exact counts)."""
    run_dir = (Path(args.runs_dir) / args.name / "count").resolve()
    count_args = argparse.Namespace(**vars(args))
    count_args.steps, count_args.log_every = args.count_steps, args.count_steps
    overrides = run_overrides(
        count_args, global_batch=2 * args.count_batch_per_rank, run_dir=run_dir
    )
    command = launch_command(args.backend, 2, overrides)
    print(f"[scaling] counting bytes: {' '.join(command)}", flush=True)
    run_entry_point(
        command, stats_dir=run_dir / "comm_stats", threads=args.threads, timeout_s=args.timeout
    )
    comm = step_traffic(run_dir / "comm_stats", 2, warmup_steps=0)
    comm["command"] = " ".join(command)
    return comm
