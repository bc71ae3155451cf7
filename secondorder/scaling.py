"""Parallel-efficiency tool: measure one config at several world sizes, project to many GPUs.

Measure (every run goes through the real entry point, launched by torchrun or horovodrun)::

    python -m secondorder.scaling measure --backend torch --world-sizes 1,2 --scaling weak \\
        --batch-per-rank 128 --steps 60 --threads 1 --out benchmarks/results/scaling \\
        --name cpu-gloo-sgd-cnn1d -- model=cnn1d data=mnist1d optimizer=sgd
    python -m secondorder.scaling measure ... -- optimizer=kfac     # another optimizer: one arg

Project (compute time per step as a documented input, bytes counted by a tiny 2-rank run of the
same model and optimizer through the entry point)::

    python -m secondorder.scaling project --compute-s 0.0853 --count \\
        --out benchmarks/results/scaling --name resnet50-sgd-8xh100 \\
        -- model=resnet50 data=synthetic data.shape=[3,32,32] data.num_classes=1000 optimizer=sgd

What is measured, per world size N (``measure``): the step time T(N) over the steady steps of
``metrics.jsonl``; throughput = global batch / T(N); communication = time the ranks spent blocked
in collectives and the exact bytes they passed (``comm_stats.rank<r>.json``, written by the
communicator, :mod:`secondorder.distributed.comm_stats`); compute = forward + backward of one
rank's micro-batches timed alone from the run's ``config.yaml``; optimizer + other = the rest
(update, curvature work, data loading). Parallel efficiency: weak scaling (fixed per-rank batch)
``throughput(N) / (N * throughput(1))``, strong scaling (fixed global batch) ``T(1) / (N T(N))``.

The projection (``project``, and the projected columns of ``measure``) is the ring all-reduce
alpha-beta model of :mod:`secondorder.distributed.cost_model`, with its documented defaults:
8xH100 NVLink bus bandwidth within a node, InfiniBand across nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from secondorder.distributed.comm_stats import KINDS
from secondorder.distributed.cost_model import PROJECTED_SIZES, Network, project
from secondorder.scaling_report import (
    amortized,
    reported_comm_bytes,
    step_seconds,
    step_traffic,
    traffic_of,
    write_outputs,
)


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

    from secondorder.config import validate
    from secondorder.data import build_data
    from secondorder.data.sampler import BatchFetcher, GlobalBatchSampler, plan_batches
    from secondorder.models import build_model
    from secondorder.optim.closure import BatchClosure

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = validate(OmegaConf.load(run_dir / "config.yaml"), world_size=summary["world_size"])
    if cfg.trainer.threads is not None:
        torch.set_num_threads(cfg.trainer.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_data(cfg.data.name, **cfg.data.kwargs)
    model = build_model(cfg.model.name, **cfg.model.kwargs).to(device)
    plan = plan_batches(
        global_batch=cfg.data.batch_size,
        world_size=summary["world_size"],
        max_micro_batch=cfg.trainer.max_micro_batch,
    )
    sampler = GlobalBatchSampler(num_samples=len(data.train), plan=plan, rank=0, seed=0)
    batches = []
    for inputs, labels in BatchFetcher(data.train).fetch(sampler.indices(0)):
        reconstruction = cfg.model.task == "reconstruction"
        targets = inputs if reconstruction else labels
        batches.append((inputs.to(device), targets.to(device)))
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

    from secondorder.distributed.comm import build_communicator

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
    from secondorder import scaling  # by module name: ``__main__`` does not pickle to the ranks
    from secondorder.distributed import testing

    body = scaling._isolated_all_reduce
    if backend == "torch":
        per_rank = testing.run_on_ranks(
            body, world_size=world_size, args=(sizes, 50), init_group=False
        )
    else:
        per_rank = testing.run_on_horovod_ranks(body, world_size=world_size, args=(sizes, 50))
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


def _run_overrides(args: argparse.Namespace, *, global_batch: int, run_dir: Path) -> list[str]:
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


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every world size through the entry point and collect the table rows."""
    out = Path(args.runs_dir) / args.name
    rows = []
    for n in args.world_sizes:
        global_batch = args.batch_per_rank * n if args.scaling == "weak" else args.global_batch
        run_dir = (out / f"n{n}").resolve()
        command = launch_command(
            args.backend, n, _run_overrides(args, global_batch=global_batch, run_dir=run_dir)
        )
        if args.dry_run:
            print(" ".join(command))
            continue
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
            zero = {k: {"bytes": 0.0, "calls": 0.0, "seconds": 0.0} for k in KINDS}
            comm = {"traffic": zero, "bytes_per_step": 0.0, "comm_s": 0.0, "isolated_comm_s": 0.0}
        compute_s = compute_seconds(run_dir, repeats=args.compute_repeats)
        rows.append(
            {
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
                "reported_comm_bytes": reported_comm_bytes(run_dir / "metrics.jsonl"),
            }
        )
    if args.dry_run:
        return {}
    efficiency(rows, args.scaling)
    result = {
        "kind": "measured",
        "name": args.name,
        "backend": args.backend,
        "scaling": args.scaling,
        "overrides": args.overrides,
        "command": "python -m secondorder.scaling " + " ".join(sys.argv[1:]),
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
        result["projection"] = _projection(
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
    overrides = _run_overrides(
        count_args, global_batch=2 * args.count_batch_per_rank, run_dir=run_dir
    )
    command = launch_command(args.backend, 2, overrides)
    print(f"[scaling] counting bytes: {' '.join(command)}", flush=True)
    run_entry_point(
        command, stats_dir=run_dir / "comm_stats", threads=args.threads, timeout_s=args.timeout
    )
    comm = step_traffic(run_dir / "comm_stats", 2, warmup_steps=0)
    comm["reported_comm_bytes"] = reported_comm_bytes(run_dir / "metrics.jsonl")
    comm["command"] = " ".join(command)
    return comm


def _network(args: argparse.Namespace) -> Network:
    return Network(
        bus_bw_intra=args.bus_bw_intra * 1e9,
        bus_bw_inter=args.bus_bw_inter * 1e9,
        alpha_intra=args.alpha_intra * 1e-6,
        alpha_inter=args.alpha_inter * 1e-6,
        gpus_per_node=args.gpus_per_node,
    )


def _projection(
    args: argparse.Namespace, *, compute_s: float, optimizer_s: float, traffic: dict
) -> dict[str, Any]:
    net = _network(args)
    return {
        "compute_s": compute_s,
        "optimizer_s": optimizer_s,
        "traffic": traffic,
        "network": asdict(net),
        "overlap": args.overlap,
        "backward_fraction": args.backward_fraction,
        "rows": project(
            compute_s=compute_s,
            optimizer_s=optimizer_s,
            traffic=traffic,
            net=net,
            sizes=tuple(args.sizes),
            overlap=args.overlap,
            backward_fraction=args.backward_fraction,
        ),
    }


def project_only(args: argparse.Namespace) -> dict[str, Any]:
    if args.count:
        counted = count_traffic(args)
    elif args.traffic:
        traffic = traffic_of(args.traffic)
        counted = {"traffic": traffic, "bytes_per_step": sum(t["bytes"] for t in traffic.values())}
    else:
        raise SystemExit("project: give --count (with overrides) or --traffic RESULT.json")
    traffic = counted["traffic"]
    if args.extra_every:
        if not args.baseline:
            raise SystemExit("project: --extra-every needs --baseline RESULT.json")
        every = dict(_kind_period(item) for item in args.extra_every)
        traffic = amortized(traffic, traffic_of(args.baseline), every)
    if args.use_reported_bytes and counted.get("reported_comm_bytes"):
        # The optimizer's own per-step figure on top of the counted bytes, as all-reduce bytes.
        traffic = json.loads(json.dumps(traffic))
        traffic["all_reduce"]["bytes"] += counted["reported_comm_bytes"]
    return {
        "kind": "projected",
        "name": args.name,
        "overrides": args.overrides,
        "command": "python -m secondorder.scaling " + " ".join(sys.argv[1:]),
        "counted": counted,
        "assumptions": args.assumption,
        "projection": _projection(
            args, compute_s=args.compute_s, optimizer_s=args.optimizer_s, traffic=traffic
        ),
    }


def _kind_period(text: str) -> tuple[str, int]:
    kind, _, period = text.partition("=")
    if kind not in KINDS or not period.isdigit() or int(period) < 1:
        raise SystemExit(f"--extra-every expects KIND=N with KIND in {KINDS}, got {text!r}")
    return kind, int(period)


# -- command line ---------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m secondorder.scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="benchmarks/results/scaling", help="reports go here")
    common.add_argument("--runs-dir", default="runs/scaling", help="run directories go here")
    common.add_argument("--name", required=True, help="output file stem")
    common.add_argument("--backend", choices=("torch", "horovod"), default="torch")
    common.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    common.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    common.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    net = common.add_argument_group("projection (defaults: secondorder/distributed/cost_model.py)")
    net.add_argument("--bus-bw-intra", type=float, default=370.0, help="GB/s within a node")
    net.add_argument("--bus-bw-inter", type=float, default=50.0, help="GB/s across nodes")
    net.add_argument("--alpha-intra", type=float, default=5.0, help="latency, us")
    net.add_argument("--alpha-inter", type=float, default=10.0, help="latency, us")
    net.add_argument("--gpus-per-node", type=int, default=8)
    net.add_argument("--overlap", type=float, default=0.0, help="share of backward hiding comm")
    net.add_argument("--backward-fraction", type=float, default=2 / 3)
    net.add_argument("--sizes", type=_ints, default=list(PROJECTED_SIZES))
    common.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")

    m = sub.add_parser("measure", parents=[common], help="run world sizes, measure, project")
    m.add_argument("--world-sizes", type=_ints, default=[1, 2])
    m.add_argument("--scaling", choices=("weak", "strong"), default="weak")
    m.add_argument("--batch-per-rank", type=int, default=128, help="weak scaling")
    m.add_argument("--global-batch", type=int, default=256, help="strong scaling")
    m.add_argument("--steps", type=int, default=60)
    m.add_argument("--log-every", type=int, default=5)
    m.add_argument("--compute-repeats", type=int, default=20)
    m.add_argument("--dry-run", action="store_true", help="print the run commands only")

    q = sub.add_parser("project", parents=[common], help="project from a given compute time")
    q.add_argument("--compute-s", type=float, required=True, help="compute seconds per step")
    q.add_argument("--optimizer-s", type=float, default=0.0)
    q.add_argument("--count", action="store_true", help="count bytes with a tiny 2-rank run")
    q.add_argument("--count-steps", type=int, default=3)
    q.add_argument("--count-batch-per-rank", type=int, default=2)
    q.add_argument("--traffic", help="take bytes per step from a result JSON")
    q.add_argument("--baseline", help="result JSON whose traffic --extra-every amortizes over")
    q.add_argument(
        "--extra-every",
        action="append",
        default=[],
        metavar="KIND=N",
        help="traffic of KIND beyond --baseline happens every N steps (e.g. broadcast=100)",
    )
    q.add_argument(
        "--use-reported-bytes",
        action="store_true",
        help="add the optimizer's comm_bytes diagnostic to the counted bytes",
    )
    q.add_argument("--assumption", action="append", default=[], help="listed with the result")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.mode == "measure":
        if args.warmup + 2 * args.log_every > args.steps:
            raise SystemExit("measure: --steps must exceed --warmup plus two --log-every")
        result = measure(args)
        if args.dry_run:
            return {}
    else:
        result = project_only(args)
    write_outputs(result, Path(args.out), args.name)
    return result


if __name__ == "__main__":
    main()
