"""Command line of the parallel-efficiency tool: ``python -m secondorder.scaling MODE ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import secondorder.scaling
from secondorder.scaling.cost_model import (
    ALPHA_INFINIBAND,
    ALPHA_NVLINK,
    BUS_BW_INFINIBAND,
    BUS_BW_NVLINK,
    PROJECTED_SIZES,
    Network,
)
from secondorder.scaling.measure import count_traffic, measure
from secondorder.scaling.project import amortized, kind_period, projection, traffic_of
from secondorder.scaling.report import is_result, pyplot, rebuild, write_outputs


def project_command(args: argparse.Namespace) -> dict[str, Any]:
    """``project``: counted (or given) bytes per step and a given compute time, projected."""
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
        every = dict(kind_period(item) for item in args.extra_every)
        traffic = amortized(traffic, traffic_of(args.baseline), every)
    return {
        "kind": "projected",
        "name": args.name,
        "overrides": args.overrides,
        "command": args.command,
        "counted": counted,
        "assumptions": args.assumption,
        "projection": projection(
            args, compute_s=args.compute_s, optimizer_s=args.optimizer_s, traffic=traffic
        ),
    }


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def _common() -> argparse.ArgumentParser:
    """Options of ``measure`` and ``project``; the network's defaults are the cost model's."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="runs/scaling", help="reports go here")
    common.add_argument("--runs-dir", default="runs/scaling", help="run directories go here")
    common.add_argument("--name", required=True, help="output file stem")
    common.add_argument("--backend", choices=("torch", "horovod"), default="torch")
    common.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    common.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    common.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    net = common.add_argument_group("projection (defaults: secondorder/scaling/cost_model.py)")
    net.add_argument(
        "--bus-bw-intra", type=float, default=BUS_BW_NVLINK / 1e9, help="GB/s within a node"
    )
    net.add_argument(
        "--bus-bw-inter", type=float, default=BUS_BW_INFINIBAND / 1e9, help="GB/s across nodes"
    )
    net.add_argument("--alpha-intra", type=float, default=ALPHA_NVLINK * 1e6, help="latency, us")
    net.add_argument(
        "--alpha-inter", type=float, default=ALPHA_INFINIBAND * 1e6, help="latency, us"
    )
    net.add_argument("--gpus-per-node", type=int, default=Network.gpus_per_node)
    net.add_argument("--overlap", type=float, default=0.0, help="share of backward hiding comm")
    net.add_argument("--backward-fraction", type=float, default=2 / 3)
    net.add_argument(
        "--hidden-fraction",
        type=float,
        default=None,
        help="measured share of gradient communication hidden by overlap (replaces --overlap)",
    )
    net.add_argument(
        "--hidden-from",
        default=None,
        metavar="RESULTS.json",
        help="take --hidden-fraction from the overlap benchmark's results.json",
    )
    net.add_argument("--sizes", type=_ints, default=list(PROJECTED_SIZES))
    common.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    return common


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m secondorder.scaling",
        description=secondorder.scaling.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="mode", required=True)
    common = _common()
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
    q.add_argument("--assumption", action="append", default=[], help="listed with the result")

    r = sub.add_parser("report", help="rebuild <name>.md and <name>.png from <name>.json")
    r.add_argument("results", nargs="+", type=Path, help="result JSON files")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.mode == "report":
        for path in args.results:
            if not is_result(path):
                raise SystemExit(f"report: {path} is not a result of this tool")
            rebuild(path)
            print(f"[scaling] rebuilt {path.with_suffix('.md')} and .png")
        return {}
    args.command = "python -m secondorder.scaling " + " ".join(argv)
    if args.mode == "measure":
        if args.warmup + 2 * args.log_every > args.steps:
            raise SystemExit("measure: --steps must exceed --warmup plus two --log-every")
        if args.dry_run:
            measure(args)
            return {}
        pyplot()  # a missing plots extra fails here, not after the runs
        result = measure(args)
    else:
        pyplot()
        result = project_command(args)
    write_outputs(result, Path(args.out), args.name)
    return result
