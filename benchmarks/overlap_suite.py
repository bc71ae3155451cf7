"""The ``overlap`` suite: exposed gradient-communication wait with and without overlap.

Each round runs the trainer twice under ``torchrun`` (``suites/overlap.yaml``: ranks, model,
batch), ``distributed.overlap=true`` and ``false`` in alternating order, and reads
``comm_wait_s`` and the step time from each run's ``metrics.jsonl``. ``results.json`` keeps
every run's per-interval values, so the table is rebuilt from it alone (``--report-only``); its
``hidden_fraction`` is what ``python -m secondorder.scaling project --hidden-from`` reads, and
the suite re-runs the scaling tool's projection with it when the suite file names one.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.records import machine, read_json, write_json
from benchmarks.report import report_header, write_readme

MODES = (True, False)  # overlap on, off


def settings(spec: dict[str, Any], *, quick: bool) -> dict[str, Any]:
    """The suite's run settings; ``quick`` replaces some and appends its overrides."""
    keys = ("nproc", "threads", "rounds", "steps", "warmup_steps", "log_every")
    out = {k: spec[k] for k in keys}
    out["overrides"] = list(spec["overrides"])
    if quick:
        out.update({k: v for k, v in spec["quick"].items() if k != "overrides"})
        out["overrides"] += spec["quick"].get("overrides", [])
    return out


def train_command(run: dict[str, Any], *, overlap: bool, run_dir: Path) -> list[str]:
    """One 2-rank (``nproc``) training run through torchrun and the real entry point."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={run['nproc']}",
        "-m",
        "secondorder.train",
        *run["overrides"],
        "distributed=torch",
        f"distributed.overlap={str(overlap).lower()}",
        f"trainer.max_steps={run['steps']}",
        f"trainer.log_every={run['log_every']}",
        f"trainer.threads={run['threads']}",
        f"trainer.run_dir={run_dir}",
        "trainer.progress=false",
        "logger=none",
    ]


def intervals(run_dir: Path, *, warmup_steps: int) -> dict[str, list[float]]:
    """Per logged interval after the warm-up: ``comm_wait_s`` and the mean step time."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    records = [r for r in records if "comm_wait_s" in r]
    out: dict[str, list[float]] = {"step": [], "comm_wait_s": [], "step_s": []}
    for before, record in zip(records, records[1:], strict=False):
        if before["step"] < warmup_steps:
            continue
        steps = record["step"] - before["step"]
        out["step"].append(record["step"])
        out["comm_wait_s"].append(round(record["comm_wait_s"], 6))
        out["step_s"].append(round((record["elapsed_s"] - before["elapsed_s"]) / steps, 6))
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of each run's median interval, and the share of the wait hidden."""
    out: dict[str, Any] = {}
    for overlap in MODES:
        mine = [r for r in runs if r["overlap"] is overlap and r["comm_wait_s"]]
        key = "on" if overlap else "off"
        for field in ("comm_wait_s", "step_s"):
            medians = [statistics.median(r[field]) for r in mine]
            out[f"{field}_{key}"] = statistics.median(medians) if medians else None
    on, off = out["comm_wait_s_on"], out["comm_wait_s_off"]
    ratio = on / off if on is not None and off else None
    out["wait_ratio"] = ratio
    out["hidden_fraction"] = None if ratio is None else min(1.0, max(0.0, 1.0 - ratio))
    return out


def measure(run: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": str(run["threads"])}
    for round_index in range(run["rounds"]):
        order = MODES if round_index % 2 == 0 else MODES[::-1]
        for overlap in order:
            run_dir = out / "runs" / f"round{round_index}-overlap-{str(overlap).lower()}"
            command = train_command(run, overlap=overlap, run_dir=run_dir)
            print(f"round {round_index}: overlap={overlap}", flush=True)
            done = subprocess.run(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            log = run_dir.with_suffix(".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(done.stdout)
            if done.returncode != 0:
                raise RuntimeError(f"training run failed ({done.returncode}); see {log}")
            found = intervals(run_dir, warmup_steps=run["warmup_steps"])
            runs.append({"round": round_index, "overlap": overlap, **found})
    return runs


def report(results: dict[str, Any], description: str) -> str:
    s = results["summary"]

    def cell(value: float | None, scale: float = 1e3) -> str:
        return "-" if value is None else f"{scale * value:.2f}"

    ratio = s["wait_ratio"]
    verdict = "-" if ratio is None else ("met" if ratio <= 0.5 else "missed")
    run = results["settings"]
    return "\n".join(
        [
            *report_header(results, description, suite="overlap"),
            f"{run['rounds']} rounds of {run['steps']} steps ({run['warmup_steps']} warm-up), "
            f"{run['nproc']} ranks; overrides: `{' '.join(run['overrides'])}`.",
            "",
            "| distributed.overlap | comm_wait_s (ms/step) | step (ms) |",
            "|---|---|---|",
            f"| true | {cell(s['comm_wait_s_on'])} | {cell(s['step_s_on'])} |",
            f"| false | {cell(s['comm_wait_s_off'])} | {cell(s['step_s_off'])} |",
            "",
            f"Exposed wait with overlap / without: {cell(ratio, 1.0)} (goal at most 0.50: "
            f"{verdict}); hidden fraction {cell(s['hidden_fraction'], 1.0)}.",
            "",
        ]
    )


def main(path: Path, *, out: Path, quick: bool, command: str, report_only: bool, **_: Any) -> int:
    spec = yaml.safe_load(path.read_text())
    results = read_json(out / "results.json")
    if not report_only:
        run = settings(spec, quick=quick)
        runs = measure(run, out)
        results = {"suite": "overlap", "quick": quick, "command": command, "machine": machine()}
        results.update({"settings": run, "runs": runs})
    if results is None:
        raise SystemExit(f"error: no {out / 'results.json'} to report from")
    results["summary"] = summary(results["runs"])
    results["hidden_fraction"] = results["summary"]["hidden_fraction"]  # for --hidden-from
    write_json(out / "results.json", results)
    print(write_readme(out, report(results, spec["description"])).read_text())
    _projection(spec.get("projection"), out, report_only=report_only)
    return 0


def _projection(projection: dict[str, Any] | None, out: Path, *, report_only: bool) -> None:
    """The scaling tool's projection with the measured hidden fraction (rebuilt if reporting)."""
    from secondorder.scaling import cli
    from secondorder.scaling.report import rebuild

    if projection is None:
        return
    name = projection["name"]
    if report_only:
        if (out / f"{name}.json").is_file():
            rebuild(out / f"{name}.json")
        return
    if read_json(out / "results.json").get("hidden_fraction") is None:
        print("no hidden fraction measured: projection left out", flush=True)
        return
    args = ["project", "--name", name, "--out", str(out), *map(str, projection["args"])]
    cli.main([*args, "--hidden-from", str(out / "results.json")])
