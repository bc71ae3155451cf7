"""Cost of one curvature-vector product relative to one gradient (forward + backward).

For each case (``benchmarks/suites/curvature_cost.yaml``): a gradient, a Pearlmutter
Hessian-vector product in both modes (reverse-over-reverse: double backward; forward-over-reverse:
jvp of the gradient), and a Gauss-Newton-vector product (Schraudolph 2002), each through
:class:`secondorder.optim.curvature.CurvatureOperator` built once per step as the optimizers do.
The per-step build (forward pass kept for the products) is timed separately. Calls are
interleaved and the figures are medians.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.cost_report import write_curvature_cost_report
from benchmarks.records import machine, read_json, write_json
from secondorder.data import Task
from secondorder.models import build_model
from secondorder.optim.curvature import CurvatureOperator, flatten, params_by_name
from secondorder.optim.losses import loss_value

HERE = Path(__file__).resolve().parent


def measure(case: dict[str, Any], *, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(case["model"], **case.get("kwargs", {}))
    x = torch.randn(case["batch_size"], *case["input_shape"])
    loss_kind = case.get("loss", "cross_entropy")
    task = Task(kind=case.get("task", "classification"), loss=loss_kind)
    labels = (
        torch.randint(0, case["num_classes"], (case["batch_size"],)) if task.uses_labels else None
    )
    y = task.targets(x, labels)
    batches = [(x, y)]
    params = params_by_name(model)
    v = flatten({k: torch.randn_like(t) for k, t in params.items()})

    def operator(**kw: Any) -> CurvatureOperator:
        return CurvatureOperator(
            model=model, params=params, batches=batches, loss_kind=loss_kind, **kw
        )

    def gradient() -> None:
        model.zero_grad()
        loss_value(loss_kind, model(x), y).backward()

    ops = {
        "hvp_reverse_over_reverse": operator(curvature="hessian", hvp_mode="reverse_over_reverse"),
        "hvp_forward_over_reverse": operator(curvature="hessian", hvp_mode="forward_over_reverse"),
        "ggn": operator(curvature="ggn"),
    }
    calls = {
        "gradient": gradient,
        **{k: (lambda op=op: op.matvec(v)) for k, op in ops.items()},
        "build_hessian": lambda: operator(curvature="hessian"),
        "build_ggn": lambda: operator(curvature="ggn"),
    }
    repeats = 2 if quick else case.get("repeats", 20)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(ts) for k, ts in times.items()}
    base = medians["gradient"]
    return {
        "case": case["name"],
        "batch_size": case["batch_size"],
        "repeats": repeats,
        "seconds": medians,
        "ratio_vs_gradient": {k: t / base for k, t in medians.items()},
    }


def main(
    *, out: Path, quick: bool, command: str, only: str | None = None, report_only: bool = False
) -> int:
    """Measure the suite's cases (``only``: some of them) and write the report; cases in
    ``out/results.json`` that this run does not repeat are kept. ``report_only`` rebuilds the
    report from that file alone."""
    spec = yaml.safe_load((HERE / "suites" / "curvature_cost.yaml").read_text())
    torch.set_num_threads(spec.get("threads", 1))
    names = [c["name"] for c in spec["cases"]]
    cases = [] if report_only else spec["cases"][:1] if quick else spec["cases"]
    if only:
        cases = [c for c in cases if c["name"] in only.split(",")]
    previous = read_json(out / "results.json")
    results = [r for r in previous or [] if r["case"] in names]
    for case in cases:
        result = {**measure(case, quick=quick), "command": command, "machine": machine()}
        results = [r for r in results if r["case"] != case["name"]] + [result]
    results.sort(key=lambda r: names.index(r["case"]))
    write_json(out / "results.json", results)
    readme = write_curvature_cost_report(results, out, quick=quick, spec=spec)
    print(readme.read_text())
    return 0
