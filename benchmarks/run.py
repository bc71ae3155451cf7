"""Benchmark command: ``python -m benchmarks.run SUITE [--quick] [--out DIR] [--report-only]``.

Suites with a time-to-target protocol (``benchmarks/suites/<SUITE>.yaml``) tune every optimizer
on an equal grid through the real trainer, re-run the best configuration on several seeds, and
write ``benchmarks/results/<SUITE>/`` (``results.json``, ``README.md``, PNG plots; the run
folders go to its git-ignored ``runs/``). The ``step_cost`` suite times single steps (see
``benchmarks/step_cost.py``); ``gpu`` runs only where CUDA is present; ``input_pipeline`` times
the ImageNet transforms and the trainer's data waits (``benchmarks/input_pipeline.py``);
``scaling`` runs the parallel-efficiency tool (``benchmarks/scaling_suite.py``); ``overlap``
compares the gradient all-reduce with and without overlap on 2 ranks
(``benchmarks/overlap_suite.py``). ``--report-only`` rebuilds every table and plot of a suite
from its ``results.json`` alone.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from benchmarks.harness import Suite, run_suite, stop_on_sigterm
from benchmarks.report import write_report
from secondorder.scaling.report import pyplot

HERE = Path(__file__).resolve().parent
SUITES = HERE / "suites"


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("suite", choices=sorted(p.stem for p in SUITES.glob("*.yaml")))
    cli.add_argument("--quick", action="store_true", help="two optimizers, a few steps")
    cli.add_argument("--out", type=Path, default=None, help="results folder")
    cli.add_argument(
        "--optimizers",
        default=None,
        help="comma-separated subset of the suite's optimizers (cases for cost suites, runs for "
        "the scaling suite)",
    )
    cli.add_argument("--seeds", type=int, default=None, help="use only the first N seeds")
    cli.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild the report from results.json (and from the sweeps that have "
        "finished in the git-ignored runs/ folder, e.g. of a suite still running)",
    )
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if argv is None:  # the command line, not a test calling main()
        stop_on_sigterm()
    out = args.out or HERE / "results" / (args.suite + ("_quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve().is_relative_to(Path.cwd()):  # recorded paths stay repository-relative
        out = out.resolve().relative_to(Path.cwd())
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    path = SUITES / f"{args.suite}.yaml"
    kind = yaml.safe_load(path.read_text()).get("kind", "time_to_target")
    pyplot()  # a missing plots extra fails here, before any run
    only = set(args.optimizers.split(",")) if args.optimizers else None
    common = {"out": out, "quick": args.quick, "command": command, "only": args.optimizers}
    if kind in ("step_cost", "gpu"):
        from benchmarks import step_cost

        return step_cost.main(suite=args.suite, report_only=args.report_only, **common)
    if kind == "input_pipeline":
        from benchmarks import input_pipeline

        return input_pipeline.main(report_only=args.report_only, **common)
    if kind == "curvature_cost":
        from benchmarks import curvature_cost

        return curvature_cost.main(report_only=args.report_only, **common)
    if kind == "overlap":
        from benchmarks import overlap_suite

        return overlap_suite.main(path, report_only=args.report_only, **common)
    if kind == "batch_scaling_v2":
        from benchmarks import batch_scaling_v2

        return batch_scaling_v2.main(
            path, report_only=args.report_only, max_seeds=args.seeds, **common
        )
    if kind == "scaling":
        from benchmarks import scaling_suite

        if args.quick:
            raise SystemExit("error: the scaling suite has no --quick version")
        return scaling_suite.main(path, out=out, only=only, report_only=args.report_only)
    suite = Suite.load(path)
    unknown = (only or set()) - {o.name for o in suite.optimizers}
    if unknown:
        raise SystemExit(f"error: {args.suite} has no optimizer {', '.join(sorted(unknown))}")
    results = run_suite(
        suite,
        out,
        quick=args.quick,
        max_seeds=args.seeds,
        report_only=args.report_only,
        only=only,
        command=command,
    )
    readme = write_report(results, out, description=suite.description, metric=suite.plot_metric)
    print(readme.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
