"""Batch scaling v2: steps to the large-batch workload's target from batch 512 to 65536.

``python -m benchmarks.run batch_scaling_v2 [--optimizers a,b] [--seeds N] [--quick]
[--report-only]``

The protocol of Shallue et al. 2018 ("Measuring the Effects of Data Parallelism on Neural
Network Training") on ``experiment=large_batch``: at every global batch size every optimizer's
learning rate is tuned with the same number of trials, the best trial's steps to target are
measured on every seed, and ``S(B) = S_min (1 + B_crit / B)`` (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training") is fitted per optimizer
(:mod:`benchmarks.batch_scaling_v2_report`).

The search is sequential, not a fixed grid: at 512 it starts from the suite's learning rate, at
each larger batch from the best one of the batch below (the optimum moves with the batch, and a
fixed grid wide enough for 512-65536 would spend most trials far from it). Trial 1 is ``c``,
trial 2 ``2c``, trial 3 ``4c`` if ``2c`` won and ``c/2`` otherwise. A trial's step cap is the
best trial's steps so far: past it, it can no longer win, so it is stopped there (steps to a
target are what the suite measures; a trial that ties does not replace the earlier one).

Each trial is an ordinary run folder of ``python -m secondorder.train`` under ``runs/`` (git-
ignored) with a ``trial.json`` that says what it was; a suite stopped and started again keeps
every run whose command is unchanged. Two suite processes may run side by side on different
optimizers (``--optimizers``); ``results.json`` is rebuilt from every finished run folder here
and, for optimizers without one, kept from the existing file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.batch_scaling_v2_report import write_report
from benchmarks.records import machine, read_json, write_json


@dataclass
class Plan:
    """The suite file, resolved for a normal or a ``--quick`` run."""

    name: str
    description: str
    base: list[str]
    points: dict[int, dict[str, int]]
    max_micro_batch: int
    seeds: list[int]
    trials: int
    optimizers: dict[str, dict[str, Any]]
    quick: bool

    @classmethod
    def load(cls, path: Path, *, quick: bool, max_seeds: int | None) -> Plan:
        raw = yaml.safe_load(path.read_text())
        points = {int(b): dict(p) for b, p in raw["points"].items()}
        base, seeds = list(raw["base"]), list(raw["seeds"])[:max_seeds]
        if quick:
            q = raw["quick"]
            points = {
                b: {"eval_every": q["eval_every"], "warmup_steps": 0, "max_steps": q["max_steps"]}
                for b in q["batches"]
            }
            base, seeds = base + list(q["overrides"]), seeds[:1]
        if raw["trials"] != 3:
            raise ValueError(f"{path}: the search is written for 3 trials, got {raw['trials']}")
        return cls(
            name=raw["name"],
            description=raw["description"],
            base=base,
            points=dict(sorted(points.items())),
            max_micro_batch=int(raw["max_micro_batch"]),
            seeds=seeds,
            trials=3,
            optimizers=dict(raw["optimizers"]),
            quick=quick,
        )


def _lr(value: float) -> float:
    return float(f"{value:.6g}")


def tied_overrides(spec: dict[str, Any], lr: float) -> list[str]:
    """Settings that move with the learning rate, given at the starting rate ``spec["lr"]`` and
    scaled by ``(lr / spec["lr"])²``: K-FAC's KL clip, which caps ``lr² <V, ∇>`` (Ba et al.
    2017), so that a trial's factor on the rate scales its step whether the clip acts or not."""
    return [
        f"{key}={_lr(value * (lr / spec['lr']) ** 2)}"
        for key, value in spec.get("tied", {}).items()
    ]


def run_trial(
    plan: Plan, out: Path, opt: str, batch: int, lr: float, seed: int, cap: int, role: str
) -> dict[str, Any]:
    """Train one trial (or keep its finished run with the same command); its record.

    ``role`` is ``tune1``..``tune3`` (the search's trials, in order) or ``seed``."""
    point = plan.points[batch]
    run_dir = out / "runs" / opt / f"b{batch}" / f"lr{lr:g}-seed{seed}"
    overrides = [
        *plan.base,
        *plan.optimizers[opt]["overrides"],
        f"optimizer.lr={lr}",
        *tied_overrides(plan.optimizers[opt], lr),
        f"data.batch_size={batch}",
        f"trainer.max_micro_batch={min(batch, plan.max_micro_batch)}",
        f"trainer.seed={seed}",
        f"trainer.max_steps={cap}",
        f"trainer.eval_every={point['eval_every']}",
        f"trainer.log_every={point['eval_every']}",
        f"trainer.lr_schedule.warmup_steps={point['warmup_steps']}",
        "logger=none",
        "trainer.progress=false",
    ]
    command = "python -m secondorder.train " + " ".join(overrides)
    record = read_json(run_dir / "trial.json")
    if record and record.get("command") == command and (run_dir / "summary.json").is_file():
        return _finished(run_dir, record)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    args = [sys.executable, "-m", "secondorder.train", *overrides, f"trainer.run_dir={run_dir}"]
    proc = subprocess.run(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode not in (0, 1):  # 1: diverged, recorded in its summary
        raise RuntimeError(f"trial failed ({proc.returncode}): {command}\n{proc.stderr[-2000:]}")
    record = {"optimizer": opt, "batch": batch, "lr": lr, "seed": seed, "cap": cap}
    record.update(role=role, command=command)
    write_json(run_dir / "trial.json", record)
    row = _finished(run_dir, record)
    steps, wall = row["steps_to_target"], row["wall_s"]
    print(f"{opt} b{batch} lr{lr:g} seed{seed} ({role}): {steps} steps to target, {wall:.0f} s")
    return row


def _finished(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """A trial's record with its summary's figures and its training throughput (median over
    its logged steps, evaluations excluded)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rates = sorted(r["images_per_s"] for r in map(json.loads, lines) if "images_per_s" in r)
    keep = ("status", "steps", "steps_to_target", "wall_s", "wall_to_target_s", "final_eval_loss")
    return {
        **{k: v for k, v in record.items() if k != "command"},
        **{k: summary.get(k) for k in keep},
        "images_per_s": rates[len(rates) // 2] if rates else None,
        "command": record["command"],
    }


def better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    """Fewer steps to target wins; between two misses, the lower final eval loss (a diverged
    run's counts as infinite). Unlike the harness's ``better``, a tie in steps keeps the earlier
    trial instead of the faster one: the search decides where to go next from it, and wall times
    taken beside another suite process would make that decision depend on the load."""
    if b is None:
        return True
    sa, sb = a["steps_to_target"], b["steps_to_target"]
    if sa is not None or sb is not None:
        return sa is not None and (sb is None or sa < sb)
    return _miss_loss(a) < _miss_loss(b)


def best_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The first row that no later one beats."""
    best = None
    for row in rows:
        if better(row, best):
            best = row
    assert best is not None, "no trials"
    return best


def _miss_loss(row: dict[str, Any]) -> float:
    loss = row["final_eval_loss"]
    if row["status"] == "diverged" or loss is None or not math.isfinite(loss):
        return math.inf
    return float(loss)


def search(plan: Plan, out: Path, opt: str, batch: int, centre: float) -> list[dict[str, Any]]:
    """The 3 learning-rate trials at one batch size (seed ``plan.seeds[0]``)."""
    cap = plan.points[batch]["max_steps"]
    trials: list[dict[str, Any]] = []

    def trial(lr: float) -> dict[str, Any]:
        best = best_of(trials) if trials else None
        limit = cap if best is None or best["steps_to_target"] is None else best["steps_to_target"]
        role = f"tune{len(trials) + 1}"
        trials.append(run_trial(plan, out, opt, batch, _lr(lr), plan.seeds[0], limit, role))
        return trials[-1]

    first, second = trial(centre), trial(2 * centre)
    trial(4 * centre if better(second, first) else centre / 2)
    return trials


def run_optimizer(plan: Plan, out: Path, opt: str) -> None:
    """Every batch size in turn (those the optimizer's ``batches`` lists, where it has one),
    each search starting from the best rate of the one below; ``lr`` is the first trial at the
    first."""
    spec = plan.optimizers[opt]
    centre = float(spec["lr"])
    batches = [b for b in plan.points if b in spec.get("batches", plan.points)]
    for batch in batches or plan.points:  # a --quick run's batches may not be among them
        best = best_of(search(plan, out, opt, batch, centre))
        for seed in plan.seeds[1:]:
            run_trial(
                plan, out, opt, batch, best["lr"], seed, plan.points[batch]["max_steps"], "seed"
            )
        centre = best["lr"]


def collect(plan: Plan, out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Per optimizer and batch: the tuning trials, the best, and the best rate's seed runs."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for record_path in sorted((out / "runs").glob("*/b*/*/trial.json")):
        run_dir = record_path.parent
        if not (run_dir / "summary.json").is_file():
            continue
        row = _finished(run_dir, json.loads(record_path.read_text()))
        if row["optimizer"] not in plan.optimizers or row["batch"] not in plan.points:
            continue
        found.setdefault(row["optimizer"], {}).setdefault(row["batch"], {"rows": []})
        found[row["optimizer"]][row["batch"]]["rows"].append(row)
    for opt, cells in found.items():
        for batch, cell in list(cells.items()):
            rows = cell.pop("rows")
            tuning = [r for r in rows if r["role"].startswith("tune")]
            if len(tuning) < plan.trials:  # a search still running, or stopped: left out
                print(f"left out, search not finished: {opt} at batch {batch}", flush=True)
                del cells[batch]
                continue
            cell["trials"] = sorted(tuning, key=lambda r: r["role"])  # ties: the earlier wins
            best = best_of(cell["trials"])
            cell["best_lr"] = best["lr"]
            seeds = [r for r in rows if r["role"] == "seed" and r["lr"] == best["lr"]]
            cell["seeds"] = [best, *sorted(seeds, key=lambda r: r["seed"])]
    return found


def main(
    path: Path,
    *,
    out: Path,
    quick: bool,
    command: str,
    only: str | None,
    report_only: bool,
    max_seeds: int | None = None,
) -> int:
    plan = Plan.load(path, quick=quick, max_seeds=max_seeds)
    chosen = only.split(",") if only else list(plan.optimizers)
    unknown = set(chosen) - set(plan.optimizers)
    if unknown:
        raise SystemExit(f"error: {plan.name} has no optimizer {', '.join(sorted(unknown))}")
    if not report_only:
        for opt in chosen:
            run_optimizer(plan, out, opt)
    found = collect(plan, out)
    old = read_json(out / "results.json") or {}
    kept = {o: v for o, v in old.get("optimizers", {}).items() if o not in found}
    results = {
        "suite": plan.name,
        "quick": quick,
        "description": plan.description,
        "seeds": plan.seeds,
        "trials": plan.trials,
        # Every suite command that trained runs kept here (a suite run in parts, e.g. one
        # process per optimizer side by side), in the order they were run.
        "commands": list(
            dict.fromkeys([*old.get("commands", []), *([] if report_only else [command])])
        ),
        "machine": machine() if not report_only or not old else old.get("machine"),
        "optimizers": {
            **kept,
            **{o: {str(b): c for b, c in sorted(cells.items())} for o, cells in found.items()},
        },
    }
    write_report(results, out)
    write_json(out / "results.json", results)
    print((out / "README.md").read_text())
    return 0
