"""The large-batch workload's gradient noise scale along training, the measurement behind it.

``python -m benchmarks.large_batch_workload [--quick] [--runs OPT:BATCH:LR,...] [--out DIR]
[--set KEY=VALUE ...] [--report-only]``

Each run is ``python -m secondorder.train experiment=large_batch`` (the teacher-student task with
label noise, ``secondorder/data/teacher_student_data.py``) on one process, its global batch split
into 8 micro-batches so the trainer's meter (``trainer.noise_scale_every``) measures
B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) every 2 steps, until the preset's target: eval
loss within a margin of the teacher's own (the Bayes loss). The first run gives the committed
curve, B_simple against the step and against the excess eval loss; further runs (other batches,
learning rates or optimizers) add their steps to target. ``results.json`` holds, besides each
run's curve, the resolved config, seed, command and machine and the teacher's scores, so
``--report-only`` rebuilds ``README.md`` and ``noise_scale.png`` from it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from benchmarks.records import machine, read_json, write_json
from benchmarks.report import write_readme
from secondorder.data.teacher_student_data import teacher_student_bayes
from secondorder.scaling.report import pyplot

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "large_batch_workload"
#: optimizer:batch:learning rate; the first run's curve is the workload's measurement.
RUNS = "adamw:8192:0.003"
MICRO_BATCHES = 8
QUICK_BATCH = 512
MEASURE_EVERY = 2
DATA_KEYS = ("num_samples", "eval_samples", "input_dim", "teacher_width", "teacher_depth")
DATA_KEYS += ("num_classes", "temperature", "seed")
QUICK = [
    "data.eval_samples=2048",
    "data.eval_batch_size=2048",
    "trainer.max_steps=8",
    "trainer.eval_every=4",
]


def parse_runs(text: str) -> list[tuple[str, int, float]]:
    """``adamw:8192:0.003,kfac:8192:0.1`` -> ``[(optimizer, batch, lr), ...]``."""
    runs = []
    for item in text.split(","):
        optimizer, batch, lr = item.split(":")
        runs.append((optimizer, int(batch), float(lr)))
    return runs


def overrides(
    optimizer: str, batch: int, lr: float, *, quick: bool, run_dir: Path, extra: list[str]
) -> list[str]:
    """The run's overrides of the preset, then ``extra``; quick: batch 512, 8 steps, a small
    eval split."""
    batch = QUICK_BATCH if quick else batch
    values = [
        "experiment=large_batch",
        f"optimizer={optimizer}",
        f"optimizer.lr={lr}",
        f"data.batch_size={batch}",
        f"trainer.max_micro_batch={batch // MICRO_BATCHES}",
        f"trainer.noise_scale_every={MEASURE_EVERY}",
        f"trainer.log_every={MEASURE_EVERY}",
        "trainer.progress=false",
        "trainer.threads=1",
        "logger=none",
        f"trainer.run_dir={run_dir}",
    ]
    return values + (QUICK if quick else []) + extra


def run_one(
    optimizer: str, batch: int, lr: float, *, quick: bool, out: Path, extra: list[str]
) -> dict[str, Any]:
    """Train one run to the target (or its step limit); return its entry of ``results.json``."""
    run_dir = out / "runs" / f"{optimizer}-b{QUICK_BATCH if quick else batch}-lr{lr:g}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run folder of an earlier measurement
    command = [sys.executable, "-m", "secondorder.train"]
    command += overrides(optimizer, batch, lr, quick=quick, run_dir=run_dir, extra=extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    # The command as anyone reruns it: the run folder is this machine's.
    shown = [arg for arg in command[1:] if not arg.startswith("trainer.run_dir=")]
    return entry_of(run_dir, " ".join(["python", *shown]))


def entry_of(run_dir: Path, command: str) -> dict[str, Any]:
    """A finished run's config, summary and curves (every measurement and evaluation)."""
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "noise_scale" in r]
    evaluations = [r for r in records if "eval_loss" in r]
    config["trainer"]["run_dir"] = f"runs/{run_dir.name}"  # under --out, on the machine that ran

    def column(rows: list[dict[str, Any]], key: str) -> list[float]:
        return [float(f"{r[key]:.6g}") for r in rows]

    return {
        "optimizer": summary["optimizer"],
        "batch": summary["global_batch_size"],
        "micro_batch": summary["micro_batch_size"],
        "lr": config["optimizer"]["lr"],
        "seed": config["trainer"]["seed"],
        "command": command,
        "status": summary["status"],
        "steps_to_target": summary["steps_to_target"],
        "wall_to_target_s": summary["wall_to_target_s"],
        "config": config,
        "train": {
            "step": [r["step"] for r in train],
            **{k: column(train, k) for k in ("train_loss", "noise_scale")},
            "grad_sq": column(train, "noise_scale_grad_sq"),
            "trace": column(train, "noise_scale_trace"),
        },
        "eval": {
            "step": [r["step"] for r in evaluations],
            **{k: column(evaluations, k) for k in ("eval_loss", "eval_accuracy")},
        },
    }


def noise_scale_at(run: dict[str, Any], step: int) -> float | None:
    """The (smoothed) B_simple of the last measurement at or before ``step``."""
    pairs = zip(run["train"]["step"], run["train"]["noise_scale"], strict=True)
    values = [value for s, value in pairs if s <= step]
    return values[-1] if values else None


def report(results: dict[str, Any], out: Path) -> None:
    """``README.md`` (tables above the hand-written notes) and ``noise_scale.png``."""
    write_readme(out, markdown(results))
    plot(results, out / "noise_scale.png")


def markdown(results: dict[str, Any]) -> str:
    bayes, target, runs = results["bayes"], results["target"], results["runs"]
    data = results["runs"][0]["config"]["data"]
    lines = [
        "# Large-batch workload: teacher-student classification with label noise",
        "",
        f"Data: `{results['data']}`. Student: `{results['model']}`.",
        f"Teacher on the eval split ({data['eval_samples']} examples): loss "
        f"{bayes['eval_loss']:.4f} (expected: entropy {bayes['entropy']:.4f}), accuracy "
        f"{bayes['eval_accuracy']:.4f}. Target: {target['metric']} <= {target['value']} "
        f"(teacher + {target['value'] - bayes['eval_loss']:.4f}).",
        "",
        f"Machine: {results['machine']}. Command: `{results['command']}`.",
        "",
        "| optimizer | batch | lr | steps to target | wall to target (s) | B_simple at target |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        steps = run["steps_to_target"]
        at_target = noise_scale_at(run, steps) if steps is not None else None
        lines.append(
            f"| {run['optimizer']} | {run['batch']} | {run['lr']:g} | "
            f"{steps if steps is not None else 'not reached'} | "
            f"{_number(run['wall_to_target_s'], '.1f')} | {_number(at_target, '.0f')} |"
        )
    first = runs[0]
    lines += [
        "",
        f"B_simple along the first run ({first['optimizer']}, batch {first['batch']}, micro-batch "
        f"{first['micro_batch']}, measured every {MEASURE_EVERY} steps, smoothed):",
        "",
        "| step | eval loss | excess over teacher | eval accuracy | B_simple |",
        "|---|---|---|---|---|",
    ]
    evaluations = first["eval"]
    for step, loss, accuracy in zip(
        evaluations["step"], evaluations["eval_loss"], evaluations["eval_accuracy"], strict=True
    ):
        lines.append(
            f"| {step} | {loss:.4f} | {loss - bayes['eval_loss']:.4f} | {accuracy:.4f} | "
            f"{_number(noise_scale_at(first, step), '.0f')} |"
        )
    return "\n".join(lines)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot(results: dict[str, Any], path: Path) -> None:
    """B_simple against the step and against the excess eval loss, one line per run."""
    plt = pyplot()
    figure, (by_step, by_excess) = plt.subplots(1, 2, figsize=(11, 4))
    teacher = results["bayes"]["eval_loss"]
    for run in results["runs"]:
        label = f"{run['optimizer']} b{run['batch']} lr {run['lr']:g}"
        by_step.plot(run["train"]["step"], run["train"]["noise_scale"], label=label)
        evaluations = run["eval"]
        pairs = [
            (loss - teacher, noise_scale_at(run, step))
            for step, loss in zip(evaluations["step"], evaluations["eval_loss"], strict=True)
        ]
        pairs = [(x, y) for x, y in pairs if y is not None and x > 0 and y > 0]
        if pairs:
            by_excess.plot(*zip(*pairs, strict=True), marker="o", label=label)
    margin = results["target"]["value"] - teacher
    for axis in (by_step, by_excess):
        axis.axhline(8192, color="grey", linestyle=":", label="8192")
    by_excess.axvline(margin, color="black", linestyle="--", label="target")
    by_step.set(xlabel="step", ylabel="B_simple = tr(Σ)/|G|²", yscale="log")
    by_excess.set(xlabel="eval loss - teacher's", ylabel="B_simple", xscale="log", yscale="log")
    by_excess.invert_xaxis()
    by_step.legend(fontsize=8)
    by_excess.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def measure(
    runs: list[tuple[str, int, float]], *, quick: bool, out: Path, extra: list[str], command: str
) -> dict[str, Any]:
    """Every run, the teacher's scores on the eval split and where it all ran."""
    entries = [run_one(o, b, lr, quick=quick, out=out, extra=extra) for o, b, lr in runs]
    config = entries[0]["config"]
    data = {key: config["data"][key] for key in DATA_KEYS}
    model = {k: v for k, v in config["model"].items() if k not in ("weights", "sync_bn")}
    return {
        "command": command,
        "machine": machine(),
        "seed": config["trainer"]["seed"],
        "data": ", ".join(f"{k}={v}" for k, v in data.items()),
        "model": ", ".join(f"{k}={v}" for k, v in model.items()),
        "bayes": teacher_student_bayes(**data),
        "target": config["trainer"]["target"],
        "runs": entries,
    }


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("--quick", action="store_true", help="batch 512, 8 steps")
    cli.add_argument("--runs", default=RUNS, help="optimizer:batch:lr, comma-separated")
    cli.add_argument("--out", type=Path, default=OUT)
    cli.add_argument("--report-only", action="store_true", help="rebuild from results.json")
    cli.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run"
    )
    args = cli.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = read_json(args.out / "results.json")
        if results is None:
            cli.error(f"no results.json in {args.out}")
    else:
        argv = sys.argv[1:] if argv is None else argv
        command = " ".join(["python -m benchmarks.large_batch_workload", *argv])
        runs = parse_runs(args.runs)
        results = measure(runs, quick=args.quick, out=args.out, extra=args.set, command=command)
        write_json(args.out / "results.json", results)
    report(results, args.out)
    for run in results["runs"]:
        steps = run["steps_to_target"]
        at_target = noise_scale_at(run, steps) if steps is not None else None
        print(
            f"{run['optimizer']} batch {run['batch']} lr {run['lr']:g}: {run['status']}, "
            f"steps to target {steps}, B_simple there {at_target}, last B_simple "
            f"{run['train']['noise_scale'][-1] if run['train']['noise_scale'] else None}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
