"""Per-step cost of every optimizer relative to SGD on the same model and batch.

Each case (``benchmarks/suites/step_cost.yaml``, or ``gpu.yaml`` for the GPU suite) builds the
model and the optimizers through the same config path as the trainer, feeds fixed random
batches of the case's shape, and times ``optimizer.step(closure)`` in one process. The time is
split into the closure's forward/backward (gradient work) and the rest — the optimizer's own
work: curvature products, factor statistics, inversions, preconditioning and the update.
Communication is measured separately, on several ranks, by ``python -m secondorder.scaling``.
Each optimizer is timed in ``repeats`` rounds of ``steps`` steps, interleaved with the other
optimizers' rounds so that load changes on a shared machine hit all alike; the figures are
medians over rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from secondorder import train
from secondorder.build import build_model, build_optimizer, build_task, start_workers
from secondorder.config import RunConfig
from secondorder.data import Task
from secondorder.optim import BatchClosure
from secondorder.trainer.settings import resolve_precision

HERE = Path(__file__).resolve().parent


class TimedClosure(BatchClosure):
    """A closure that adds up the seconds spent in its forward/backward passes."""

    seconds = 0.0

    def __call__(self) -> torch.Tensor:
        start = time.perf_counter()
        loss = super().__call__()
        _sync(loss.device)
        TimedClosure.seconds += time.perf_counter() - start
        return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(case: dict[str, Any], task: Task, device: torch.device, generator: torch.Generator):
    shape = [case["batch_size"], *case["input_shape"]]
    x = torch.randn(shape, generator=generator)
    labels = None
    if task.uses_labels:
        labels = torch.randint(0, case["num_classes"], (shape[0],), generator=generator)
    return task.to_device(x, labels, device)


def compose_run(case: dict[str, Any], optimizer: dict[str, Any]) -> RunConfig:
    """The validated run config of one optimizer of a case (what the trainer would run).

    A case without ``data`` feeds random batches of its ``input_shape`` and ``num_classes``: the
    config says so as synthetic data of that shape, which validation holds the model against.
    """
    data = case.get("data") or {
        "name": "synthetic",
        "overrides": [
            f"data.shape=[{','.join(str(d) for d in case['input_shape'])}]",
            *([f"data.num_classes={case['num_classes']}"] if "num_classes" in case else []),
        ],
    }
    return train.compose_run(
        [
            f"model={case['model']}",
            f"optimizer={optimizer['name']}",
            f"data={data['name']}",
            *data.get("overrides", []),
            *case.get("overrides", []),
            *optimizer.get("overrides", []),
        ]
    )


def build_case(
    case: dict[str, Any],
    optimizer: dict[str, Any],
    device: torch.device,
    stack: contextlib.ExitStack,
):
    """Model, optimizer and task through the trainer's builder (with its GPU step settings:
    memory format, cuDNN autotuning, ``trainer.compile``); with ``workers=…`` overrides also
    the curvature workers, stopped when ``stack`` closes (their handle is the 4th item, else
    ``None``); the 5th item is the autocast of ``trainer.precision`` (``None``: float32).
    Statistics workers draw from the case's ``data`` (a ``data=`` config choice and overrides
    of it, e.g. synthetic inputs of the case's shape)."""
    run = compose_run(case, optimizer)
    model = build_model(run, device)
    opt = build_optimizer(run, model, steps_per_epoch=100)
    handle = stack.enter_context(start_workers(run, opt))
    return model, opt, build_task(run), handle, _autocast(run, device)


def _autocast(run: RunConfig, device: torch.device):
    """The training step's autocast for ``trainer.precision`` (``auto``: bf16 on CUDA)."""
    precision = resolve_precision(run.trainer.precision, device)
    if precision == "32":
        return None
    if precision == "fp16":
        raise ValueError("the step-cost benchmark runs float32 or bf16, not fp16 loss scaling")
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _worker_pids(handle: Any) -> list[int]:
    if handle is None:
        return []
    stats = getattr(handle, "stats", None)
    return [*handle.pool.pids, *(stats.pool.pids if stats is not None else [])]


def _signal_workers(handle: Any, sig: int) -> None:
    """Pause (SIGSTOP) an optimizer's workers outside its own rounds, so that they take no CPU
    from the other optimizers' timings, and resume them (SIGCONT) for its rounds."""
    for pid in _worker_pids(handle):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def time_round(
    model, opt, task: Task, batches, steps: int, device, autocast=None
) -> dict[str, float]:
    TimedClosure.seconds = 0.0
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        closure = TimedClosure(
            model=model, micro_batches=[(x, y)], loss_kind=task.loss, autocast=autocast
        )
        opt.step(closure)
    _sync(device)
    total = (time.perf_counter() - start) / steps
    grad = TimedClosure.seconds / steps
    return {"step_s": total, "forward_backward_s": grad, "optimizer_s": total - grad}


def run_case(case: dict[str, Any], *, quick: bool, device: torch.device) -> dict[str, Any]:
    steps = 3 if quick else case["steps"]
    repeats = 1 if quick else case.get("repeats", 5)
    optimizers = case["optimizers"][:2] if quick else case["optimizers"]
    with contextlib.ExitStack() as workers:  # every optimizer's workers stop on any exit
        built = {o["label"]: build_case(case, o, device, workers) for o in optimizers}
        baseline = optimizers[0]["label"]
        generator = torch.Generator().manual_seed(0)
        batches = [_batch(case, built[baseline][2], device, generator) for _ in range(4)]
        rounds = _timed_rounds(case, built, batches, optimizers, steps, repeats, device)
    result = {
        "case": case["name"],
        "batch_size": case["batch_size"],
        "steps": steps,
        "repeats": repeats,
        "threads": case.get("threads"),
        "optimizers": {},
    }
    base_step = statistics.median(r["step_s"] for r in rounds[baseline])
    for label, rs in rounds.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        ratios = [r["step_s"] / b["step_s"] for r, b in zip(rs, rounds[baseline], strict=True)]
        result["optimizers"][label] = {
            **med,
            "ratio_vs_baseline": med["step_s"] / base_step,
            "ratio_per_round": ratios,
            "diagnostics": _diagnostics(built[label][1]),
        }
        handle = built[label][3]
        if handle is not None:
            result["optimizers"][label]["worker_threads"] = {
                "inversion": handle.settings.inversion.threads,
                "statistics": handle.settings.stats.threads,
            }
    return result


def _timed_rounds(case, built, batches, optimizers, steps, repeats, device):
    """Warm-up, then ``repeats`` rounds of every optimizer in turn; each optimizer's workers
    run only during its own rounds."""
    rounds: dict[str, list[dict[str, float]]] = {label: [] for label in built}
    try:
        for model, opt, task, handle, autocast in built.values():  # warm-up: first inverses
            warmup = min(steps, case.get("warmup", 2))
            time_round(model, opt, task, batches, warmup, device, autocast)
            _signal_workers(handle, signal.SIGSTOP)
        own_steps = {o["label"]: min(steps, o.get("steps", steps)) for o in optimizers}
        for repeat in range(repeats):
            for label, (model, opt, task, handle, autocast) in built.items():  # per-step times
                _signal_workers(handle, signal.SIGCONT)
                rounds[label].append(
                    time_round(model, opt, task, batches, own_steps[label], device, autocast)
                )
                _signal_workers(handle, signal.SIGSTOP)
                print(
                    f"{case['name']} round {repeat + 1}/{repeats} {label}: "
                    f"{1e3 * rounds[label][-1]['step_s']:.1f} ms/step",
                    flush=True,
                )
    finally:  # stopped workers cannot exit: wake them before they are closed
        for entry in built.values():
            _signal_workers(entry[3], signal.SIGCONT)
    return rounds


def _diagnostics(opt: torch.optim.Optimizer) -> dict[str, float]:
    extra = getattr(opt, "diagnostics", None) or {}
    return {k: float(v) for k, v in extra.items() if isinstance(v, (int, float, torch.Tensor))}


def main(
    *,
    suite: str,
    out: Path,
    quick: bool,
    command: str,
    only: str | None = None,
    report_only: bool = False,
) -> int:
    """Measure the suite's cases (``only``: some of them) and write the report; cases in
    ``out/results.json`` that this run does not repeat are kept, each with the command and the
    machine that measured it, so a suite can be run case by case. ``report_only`` rebuilds the
    report from that file alone."""
    from benchmarks.cost_report import write_step_cost_report
    from benchmarks.records import machine, write_json

    spec = yaml.safe_load((HERE / "suites" / f"{suite}.yaml").read_text())
    names = [c["name"] for c in spec["cases"]]
    cases = [] if report_only else spec["cases"][:1] if quick else spec["cases"]
    if only:
        cases = [c for c in cases if c["name"] in only.split(",")]
    if cases and suite == "gpu" and not torch.cuda.is_available():
        print("gpu suite skipped: CUDA is not available on this machine")
        return 0
    device = torch.device("cuda" if suite == "gpu" else "cpu")
    default_threads = spec.get("threads", torch.get_num_threads())
    results = [r for r in _previous(out) if r["case"] in names]
    for case in cases:  # written after every case: a long suite that is stopped keeps its cases
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch.set_num_threads(case.get("threads", default_threads))  # the training process's
        case = {**case, "threads": torch.get_num_threads()}
        result = {**run_case(case, quick=quick, device=device), "command": command}
        result["machine"] = machine()
        if device.type == "cuda":
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        results = [r for r in results if r["case"] != case["name"]] + [result]
        results.sort(key=lambda r: names.index(r["case"]))
        write_json(out / "results.json", results)
        print(f"case {case['name']} done", flush=True)
    readme = write_step_cost_report(results, out, suite=suite, quick=quick, spec=spec)
    print(readme.read_text())
    return 0


def _previous(out: Path) -> list[dict[str, Any]]:
    """The cases of an earlier run in ``out`` (none if there is no readable results file)."""
    try:
        previous = json.loads((out / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return previous if isinstance(previous, list) else []
