"""The gradient noise scale B_simple along training, for candidate large-batch workloads.

``python -m benchmarks.noise_scale_curves [--quick] [--workloads a,b] [--out DIR]``

Each workload is a ``python -m secondorder.train`` run with ``trainer.noise_scale_every`` on one
process whose global batch is split into micro-batches (the micro-batch gradient is the small
batch of the estimate; see ``secondorder/trainer/noise_scale.py``). From its ``metrics.jsonl``
the script writes ``noise_scale_curves.json`` — per workload the records ``step``,
``train_loss``, ``noise_scale`` (B_simple), ``noise_scale_grad_sq``, ``noise_scale_trace`` and
the evaluations — and, with matplotlib, ``noise_scale_curves.png``: B_simple against the step and
against the test accuracy reached. A workload stands for the large-batch regime when B_simple at
its target is in the thousands: only then do batches of 8k-32k still buy fewer steps
(McCandlish et al. 2018: B_crit ≈ B_noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# name -> overrides. AdamW at a moderate batch: the curve describes the workload, not a method.
WORKLOADS: dict[str, list[str]] = {
    "mnist1d_cnn_10k": [
        "model=cnn1d",
        "data=mnist1d",
        "data.num_samples=10000",
        "data.batch_size=1024",
    ],
    "mnist1d_cnn_200k": [
        "model=cnn1d",
        "data=mnist1d",
        "data.num_samples=200000",
        "data.batch_size=4096",
    ],
    "mnist1d_wide_mlp_200k": [
        "model=mlp",
        "model.hidden=[1024,1024]",
        "data=mnist1d",
        "data.num_samples=200000",
        "data.batch_size=4096",
    ],
}
COMMON = [
    "optimizer=adamw",
    "optimizer.lr=0.003",
    "logger=none",
    "trainer.progress=false",
    "trainer.threads=1",
    "data.progress=false",
]
QUICK = ["data.num_samples=2000", "data.batch_size=512", "trainer.max_steps=20"]


def overrides(name: str, *, quick: bool, run_dir: Path, steps: int) -> list[str]:
    """The run's command-line overrides: 8 micro-batches per step, B_simple every 5 steps."""
    values = dict(o.split("=", 1) for o in [*COMMON, *WORKLOADS[name]])
    values.update({"trainer.max_steps": str(steps), "trainer.eval_every": str(max(steps // 10, 1))})
    if quick:
        values.update(o.split("=", 1) for o in QUICK)
        values["trainer.eval_every"] = "10"
    batch = int(values["data.batch_size"])
    values.update(
        {
            "trainer.max_micro_batch": str(batch // 8),
            "trainer.noise_scale_every": "5",
            "trainer.log_every": "5",
            "trainer.noise_scale_smoothing": "0.8",
            "trainer.run_dir": str(run_dir),
        }
    )
    return [f"{k}={v}" for k, v in values.items()]


def run_workload(name: str, *, quick: bool, out: Path, steps: int) -> dict[str, Any]:
    """Train one workload; return its curve (every metrics record of the run)."""
    run_dir = out / "runs" / name
    command = [sys.executable, "-m", "secondorder.train"]
    command += overrides(name, quick=quick, run_dir=run_dir, steps=steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "command": " ".join(command[1:]),
        "train": [r for r in records if "noise_scale" in r],
        "eval": [r for r in records if "eval_loss" in r],
    }


def plot(curves: dict[str, dict[str, Any]], path: Path) -> None:
    """B_simple against the step, and against the test accuracy of the nearest evaluation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("matplotlib missing (pip install '.[plots]'): no plot", file=sys.stderr)
        return
    figure, (by_step, by_accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        steps = [r["step"] for r in curve["train"]]
        values = [r["noise_scale"] for r in curve["train"]]
        by_step.plot(steps, values, label=name)
        accuracy = {r["step"]: r.get("eval_accuracy") for r in curve["eval"]}
        pairs = [(accuracy[s], v) for s, v in zip(steps, values, strict=True) if s in accuracy]
        if pairs:
            by_accuracy.plot(*zip(*pairs, strict=True), marker="o", label=name)
    by_step.set(xlabel="step", ylabel="B_simple = tr(Σ)/|G|²", yscale="log")
    by_accuracy.set(xlabel="test accuracy", ylabel="B_simple", yscale="log")
    by_step.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("--quick", action="store_true", help="tiny data, 20 steps")
    cli.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated names")
    cli.add_argument("--steps", type=int, default=400, help="training steps per workload")
    cli.add_argument("--out", type=Path, default=HERE / "results" / "noise_scale")
    args = cli.parse_args(argv)
    names = args.workloads.split(",")
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        cli.error(f"unknown workloads: {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    curves = {n: run_workload(n, quick=args.quick, out=args.out, steps=args.steps) for n in names}
    (args.out / "noise_scale_curves.json").write_text(json.dumps(curves, indent=1))
    plot(curves, args.out / "noise_scale_curves.png")
    for name, curve in curves.items():
        last = curve["train"][-1] if curve["train"] else {}
        accuracy = curve["eval"][-1].get("eval_accuracy") if curve["eval"] else None
        print(
            f"{name}: B_simple {last.get('noise_scale')} at step {last.get('step')}, "
            f"test accuracy {accuracy}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
