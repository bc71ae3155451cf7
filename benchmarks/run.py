"""Benchmark command: ``python -m benchmarks.run SUITE [--quick] [--out DIR]``.

Suites with a time-to-target protocol (``benchmarks/suites/<SUITE>.yaml``) tune every optimizer
on an equal grid through the real trainer, re-run the best configuration on several seeds, and
write ``benchmarks/results/<SUITE>/`` (``results.json``, ``README.md``, PNG plots). The
``step_cost`` suite times single steps (see ``benchmarks/step_cost.py``); ``gpu`` runs only
where CUDA is present.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from benchmarks.harness import Suite, run_suite, stop_on_sigterm
from benchmarks.report import write_report

HERE = Path(__file__).resolve().parent
SUITES = HERE / "suites"


def main(argv: list[str] | None = None) -> int:
    names = sorted(p.stem for p in SUITES.glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suite", choices=names)
    parser.add_argument("--quick", action="store_true", help="two optimizers, a few steps")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument(
        "--optimizers",
        default=None,
        help="comma-separated subset of the suite's optimizers (cases for cost suites)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="use only the first N seeds")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: report the sweeps that have finished (of a suite still running)",
    )
    args = parser.parse_args(argv)
    if argv is None:  # the command line, not a test calling main()
        stop_on_sigterm()
    out = args.out or HERE / "results" / (args.suite + ("_quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve().is_relative_to(Path.cwd()):  # recorded paths stay repository-relative
        out = out.resolve().relative_to(Path.cwd())
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    path = SUITES / f"{args.suite}.yaml"
    kind = yaml.safe_load(path.read_text()).get("kind", "time_to_target")
    if kind in ("step_cost", "gpu"):
        from benchmarks import step_cost

        return step_cost.main(
            suite=args.suite, out=out, quick=args.quick, command=command, only=args.optimizers
        )
    if kind == "curvature_cost":
        from benchmarks import curvature_cost

        return curvature_cost.main(out=out, quick=args.quick, command=command, only=args.optimizers)
    suite = Suite.load(path)
    if args.optimizers:
        wanted = args.optimizers.split(",")
        suite.optimizers = [o for o in suite.optimizers if o.name in wanted]
    results = run_suite(
        suite, out, quick=args.quick, max_seeds=args.seeds, report_only=args.report_only
    )
    readme = write_report(
        results, out, command=command, description=suite.description, metric=suite.plot_metric
    )
    print(readme.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
