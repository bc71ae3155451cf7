"""Run a suite's trials through the real trainer and collect their run directories.

A suite (``benchmarks/suites/<name>.yaml``) names a base configuration, the optimizers to
compare, each optimizer's search grid (plain grids, every optimizer the same number of trials),
the metric that picks the best trial, and the seeds the best configuration is re-run with. Each
grid is one Hydra multirun of ``python -m secondorder.train``, so every trial is an ordinary run
directory with ``config.yaml``, ``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.records import curve_of, machine, read_json, write_json

SELECT_LOWER = {"steps_to_target", "wall_to_target_s", "final_eval_loss", "final_train_loss"}


@dataclass
class OptimizerEntry:
    name: str
    overrides: list[str]
    grid: dict[str, list[Any]]
    # Where the step-cost suite measured this optimizer's step ("<case>/<label>", e.g.
    # "cnn1d/newton_cg"): the report converts steps to gradient-equivalents of work with it.
    cost: str | None = None

    def trials(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*(self.grid[k] for k in keys))
        ]


@dataclass
class Suite:
    name: str
    description: str
    base: list[str]
    optimizers: list[OptimizerEntry]
    select: str
    seeds: list[int]
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # e.g. data.batch_size
    # Extra base overrides at some values of a one-key sweep, e.g. a step cap per batch size:
    # {"32768": ["trainer.max_steps=200"]}; they replace base overrides of the same key.
    point_overrides: dict[str, list[str]] = field(default_factory=dict)
    quick: list[str] = field(default_factory=list)
    plot_metric: str = "eval_accuracy"

    @classmethod
    def load(cls, path: Path) -> Suite:
        raw = yaml.safe_load(path.read_text())
        optimizers = [
            OptimizerEntry(
                name,
                list(spec.get("overrides", [])),
                dict(spec.get("grid", {})),
                spec.get("cost"),
            )
            for name, spec in raw["optimizers"].items()
        ]
        # Equal budgets for the tuned; an entry without a grid runs its defaults once (an
        # "untuned" method, with fewer trials than the others: a handicap, never an advantage).
        counts = {o.name: len(o.trials()) for o in optimizers if o.grid}
        if len(set(counts.values())) > 1:
            raise ValueError(
                f"{path}: unequal tuning budgets {counts}; give every optimizer "
                "the same number of trials (or no grid: its defaults, once)"
            )
        return cls(
            name=raw["name"],
            description=raw.get("description", ""),
            base=list(raw["base"]),
            optimizers=optimizers,
            select=raw.get("select", "steps_to_target"),
            seeds=list(raw.get("seeds", [0])),
            sweep=dict(raw.get("sweep", {})),
            point_overrides={str(k): list(v) for k, v in raw.get("point_overrides", {}).items()},
            quick=list(raw.get("quick", [])),
            plot_metric=raw.get("plot_metric", "eval_accuracy"),
        )


def better(a: dict[str, Any], b: dict[str, Any] | None, metric: str) -> bool:
    """Whether summary ``a`` beats ``b`` on ``metric`` (unreached targets lose)."""
    if b is None:
        return True
    va, vb = score(a, metric), score(b, metric)
    if va == vb == math.inf:  # neither reached the target: the one that got closer
        return _closeness(a) < _closeness(b)
    if va == vb:  # tie on steps: the faster run
        return (a.get("wall_s") or math.inf) < (b.get("wall_s") or math.inf)
    return va < vb


def _closeness(summary: dict[str, Any]) -> float:
    """How far a run that missed its target ended from it: its final value of the target's
    metric, signed so that lower is better (diverged runs and missing values: infinity)."""
    target = (summary.get("target") or {}).get("metric") or "eval_accuracy"
    value = summary.get(f"final_{target}")
    if summary.get("status") == "diverged" or value is None or not math.isfinite(value):
        return math.inf
    return -float(value) if "accuracy" in target else float(value)


def score(summary: dict[str, Any], metric: str) -> float:
    value = summary.get(metric)
    if value is None or (isinstance(value, str)) or summary.get("status") == "diverged":
        return math.inf
    return float(value) if metric in SELECT_LOWER else -float(value)


def multirun(
    overrides: list[str],
    sweep_dir: Path,
    *,
    jobs: int,
    env: dict[str, str] | None = None,
    run: bool = True,
) -> bool:
    """One Hydra multirun of the trainer; each job writes ``sweep_dir/<job number>/``.

    A sweep whose ``command.txt`` holds the same command and whose ``jobs`` runs all wrote their
    ``summary.json`` is kept, not re-run: a long suite that was stopped resumes where it was, and
    a suite re-run with more optimizers runs only the new ones. Otherwise the folder's old runs
    are removed first, so that no stale summary is collected. With ``run=False`` nothing is
    started: the return value says whether the sweep is complete (kept).
    """
    command = _sweep_command(overrides, sweep_dir)
    shown = ["python", *command[1:]]  # the interpreter's path is this machine's business
    text = " ".join(_quote(c) for c in shown) + "\n"
    done = list(sweep_dir.glob("*/summary.json"))
    if (sweep_dir / "command.txt").is_file() and (sweep_dir / "command.txt").read_text() == text:
        if len(done) == jobs:
            print(f"kept: {sweep_dir} ({jobs} finished runs of the same command)", flush=True)
            return True
    if not run:
        print(f"not finished, left out: {sweep_dir}", flush=True)
        return False
    for old in sweep_dir.glob("*"):
        if old.is_dir() and old.name.isdigit():
            shutil.rmtree(old)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "command.txt").write_text(text)
    print(f"running: {sweep_dir}", flush=True)
    proc = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = proc.communicate()[0]
    except BaseException:  # Ctrl-C or SIGTERM of the harness (see stop_on_sigterm): stop the
        proc.send_signal(signal.SIGTERM)  # sweep too (its trial checkpoints), never orphan it
        proc.wait()
        raise
    (sweep_dir / "stdout.txt").write_text(output)
    if proc.returncode not in (0, 1):  # 1: some trial diverged; recorded in its summary
        raise RuntimeError(
            f"multirun failed ({proc.returncode}); see {sweep_dir}/stdout.txt\n" + output[-2000:]
        )
    return True


def _sweep_command(overrides: list[str], sweep_dir: Path) -> list[str]:
    """The trainer's Hydra multirun over ``overrides``, one run folder per job."""
    return [
        sys.executable,
        "-m",
        "secondorder.train",
        "--multirun",
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=${hydra.job.num}",
        "trainer.run_dir=${hydra:sweep.dir}/${hydra:sweep.subdir}",
        "logger=none",
        "trainer.progress=false",
        "data.progress=false",
    ]


def stop_on_sigterm() -> None:
    """Make SIGTERM end the harness like Ctrl-C does (an exception, so a running sweep is
    stopped with it) instead of killing the harness alone and orphaning the sweep."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def merge_overrides(overrides: list[str]) -> list[str]:
    """``key=value`` overrides with later ones replacing earlier ones of the same key (in the
    earlier one's place); a list without repeated keys comes back unchanged."""
    merged: list[str] = []
    position: dict[str, int] = {}
    for item in overrides:
        key = item.split("=", 1)[0]
        if key in position:
            merged[position[key]] = item
        else:
            position[key] = len(merged)
            merged.append(item)
    return merged


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " ${}*") else arg


def grid_overrides(trials: list[dict[str, Any]]) -> list[str]:
    """A grid as Hydra sweep overrides ``key=v1,v2``."""
    keys = list(trials[0]) if trials else []
    return [f"{k}={','.join(str(v) for v in dict.fromkeys(t[k] for t in trials))}" for k in keys]


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """The summaries of the runs under ``sweep_dir``, in job order."""
    rows = []
    for summary_path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: int(p.parent.name)):
        run_dir = summary_path.parent
        summary = json.loads(summary_path.read_text())
        summary["run_dir"] = str(run_dir)
        rows.append(summary)
    return rows


def run_suite(
    suite: Suite,
    out: Path,
    *,
    quick: bool = False,
    max_seeds: int | None = None,
    report_only: bool = False,
    only: set[str] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Tune every optimizer on its grid, then re-run each best configuration on every seed.

    With one seed (``quick`` or ``max_seeds=1``) the best tuning run is the seed-0 result. With
    ``report_only`` nothing runs: the results hold the finished sweeps only (a report of a suite
    still running elsewhere, or stopped); an optimizer whose grid finished but whose seeds did
    not (or were never run: a suite run with more seeds for some optimizers than for others) is
    reported with its best tuning run alone, and the table's seeds column says 1.

    ``results.json`` is the suite's record, run folders are not kept with it: an optimizer left
    out of this run (``only``) or, with ``report_only``, one without a run folder here keeps its
    entry of the existing ``results.json``. A report from that file alone keeps the command and
    machine it records.
    """
    if suite.point_overrides and len(suite.sweep) != 1:
        raise ValueError(f"{suite.name}: point_overrides needs a sweep over exactly one key")
    optimizers = suite.optimizers[:2] if quick else suite.optimizers
    seeds = suite.seeds[:1] if quick else suite.seeds[:max_seeds]
    sweep_points = [
        dict(zip(suite.sweep, vals, strict=True))
        for vals in itertools.product(*suite.sweep.values())
    ] or [{}]
    if quick:
        sweep_points = sweep_points[:2]
    results = _previous(out, suite.name, quick)
    kept = {
        (_key(p["point"]), name): e
        for p in results["points"]
        for name, e in p["optimizers"].items()
    }
    results["points"] = []
    collected = False
    for point in sweep_points:
        tag = "_".join(f"{k.split('.')[-1]}{v}" for k, v in point.items()) or "main"
        entry: dict[str, Any] = {"point": point, "optimizers": {}}
        for opt in optimizers:
            chosen = only is None or opt.name in only
            here = (out / "runs" / tag / opt.name / "tune").exists()
            if chosen and (here or not report_only):
                got = _optimizer_entry(suite, opt, point, out, tag, seeds, quick, report_only)
                collected = collected or got is not None
            else:
                got = kept.get((_key(point), opt.name))
            if got is not None:
                entry["optimizers"][opt.name] = got
        if entry["optimizers"]:
            results["points"].append(entry)
    if collected or results["command"] is None:
        results.update(seeds=seeds, command=command, machine=machine())
    write_json(out / "results.json", results)
    return results


def _previous(out: Path, name: str, quick: bool) -> dict[str, Any]:
    """The existing ``results.json`` of this suite (and ``quick`` flag), or an empty one."""
    old = read_json(out / "results.json")
    if not isinstance(old, dict) or (old.get("suite"), old.get("quick")) != (name, quick):
        old = {}
    head = {"suite": name, "quick": quick, "seeds": None, "command": None, "machine": None}
    return {**head, "points": [], **old}


def _key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def _optimizer_entry(
    suite: Suite,
    opt: OptimizerEntry,
    point: dict[str, Any],
    out: Path,
    tag: str,
    seeds: list[int],
    quick: bool,
    report_only: bool,
) -> dict[str, Any] | None:
    """One optimizer at one sweep point: its grid, then its best trial on every seed (``None``
    where its grid has not finished)."""
    extra = [o for v in point.values() for o in suite.point_overrides.get(str(v), [])]
    base = merge_overrides([*suite.base, *extra, *(suite.quick if quick else [])])
    point_over = [f"{k}={v}" for k, v in point.items()]
    trials = opt.trials()[:2] if quick else opt.trials()
    tune_dir = out / "runs" / tag / opt.name / "tune"
    tune = [*base, *point_over, *opt.overrides, *grid_overrides(trials), f"trainer.seed={seeds[0]}"]
    if not multirun(tune, tune_dir, jobs=len(trials), run=not report_only):
        return None
    tuned = collect(tune_dir)
    best = None
    for row in tuned:
        if better(row, best, suite.select):
            best = row
    best_over = _trial_of(best, trials)
    if len(seeds) == 1:  # the tuning run of the best trial is the seed-0 run
        seed_rows = [best] if best is not None else []
    else:
        seed_dir = out / "runs" / tag / opt.name / "seeds"
        rerun = [*base, *point_over, *opt.overrides, *(f"{k}={v}" for k, v in best_over.items())]
        rerun.append(f"trainer.seed={','.join(str(s) for s in seeds)}")
        if multirun(rerun, seed_dir, jobs=len(seeds), run=not report_only):
            seed_rows = collect(seed_dir)
        elif best is not None:  # report only: seeds not run (yet), the tuning seed's run
            print(f"reported with its tuning seed only: {opt.name} at {tag}", flush=True)
            seed_rows = [best]
        else:
            return None
    return {
        "trials": [_slim(r, suite.plot_metric) for r in tuned],
        "best": best_over,
        "seeds": [_slim(r, suite.plot_metric) for r in seed_rows],
        "cost": opt.cost,
    }


def _trial_of(summary: dict[str, Any] | None, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Which grid point produced ``summary`` (read back from its resolved config)."""
    if summary is None:
        return trials[0]
    config = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
    picked = {}
    for key in trials[0]:
        node: Any = config
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    return picked


def _slim(row: dict[str, Any], metric: str) -> dict[str, Any]:
    """What the report needs of one run: its summary's figures, its optimizer config and seed,
    and the curve of ``metric`` (the run folder itself is not kept with the results)."""
    keep = (
        "status",
        "steps",
        "samples_seen",
        "wall_s",
        "steps_to_target",
        "wall_to_target_s",
        "final_eval_accuracy",
        "final_eval_loss",
        "final_train_loss",
        "global_batch_size",
        "run_dir",
    )
    out = {k: row.get(k) for k in keep}
    config = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text())
    out["optimizer"] = config["optimizer"]
    out["seed"] = config["trainer"]["seed"]
    out["curve"] = curve_of(row["run_dir"], metric)
    return out
