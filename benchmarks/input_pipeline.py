"""The ``input_pipeline`` suite: transform throughput per CPU core, old path against new, and the
data-wait fraction of short training runs (``benchmarks/suites/input_pipeline.yaml``).

Transforms are timed in one single-threaded process on the files of a generated ImageNet-format
folder; throughput per core is images over the CPU seconds the process used (``process_time``),
which a loaded machine disturbs less than wall time. Each round times every path on the same
images, paths interleaved; figures are medians over rounds. The baseline is a copy of the
transform as it was before reduced-scale decoding (full decode, crop/resize/flip, float
normalisation in the worker); the new path is :meth:`ImageFolderDataset.sample` itself.

Trainer cases run ``python -m secondorder.train`` and read ``mean_data_wait_fraction`` from the
run's summary and ``images_per_s`` from its metrics, where the trainer records them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from benchmarks.records import machine, read_json, write_json
from secondorder.data import imagenet
from secondorder.data.generate_imagenet import generate
from secondorder.data.imagenet_data import IMAGENET_MEAN, IMAGENET_STD

HERE = Path(__file__).resolve().parent
TRANSFORMS = "transforms"
_MEAN = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(-1, 1, 1)


# -- the baseline: the transform as it was (full decode, float normalisation) ---------------------


def baseline_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop box from torch's global RNG, as the old dataset drew it."""
    area = width * height
    log_low, log_high = math.log(3.0 / 4.0), math.log(4.0 / 3.0)
    for _ in range(10):
        target_area = area * float(torch.empty(()).uniform_(0.08, 1.0))
        aspect = math.exp(float(torch.empty(()).uniform_(log_low, log_high)))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, ()))
            left = int(torch.randint(0, width - crop_w + 1, ()))
            return left, top, crop_w, crop_h
    ratio = width / height
    if ratio < 3.0 / 4.0:
        crop_w, crop_h = width, int(round(width / (3.0 / 4.0)))
    elif ratio > 4.0 / 3.0:
        crop_w, crop_h = int(round(height * (4.0 / 3.0))), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def _baseline_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    x = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    return x.sub_(_MEAN).div_(_STD)


def baseline_train(path: Path, size: int) -> torch.Tensor:
    """Full-size decode, random resized crop, flip, float normalisation."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    left, top, width, height = baseline_crop_box(image.width, image.height)
    box = (left, top, left + width, top + height)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if torch.rand(()) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _baseline_tensor(image)


def baseline_eval(path: Path, size: int, resize: int) -> torch.Tensor:
    """Full-size decode, shorter side to ``resize``, centre crop, float normalisation."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return _baseline_tensor(image.crop((left, top, left + size, top + size)))


# -- measurements ------------------------------------------------------------------------------


def generated_folder(spec: dict[str, int]) -> Path:
    """The generated ImageNet folder of ``spec``, written once into the data folder (reused)."""
    base = Path(os.environ.get("SECONDORDER_DATA", "data"))
    root = base / (
        f"imagenet_generated_c{spec['classes']}_t{spec['train_per_class']}"
        f"_v{spec['val_per_class']}_s{spec['seed']}"
    )
    done = root / ".complete"
    if not done.exists():
        print(f"writing the generated ImageNet folder {root}", flush=True)
        generate(root, **spec)
        done.write_text("written by benchmarks/input_pipeline.py\n")
    return root


def measure_transforms(
    root: Path, spec: dict[str, Any], case: dict[str, Any], *, quick: bool
) -> dict[str, Any]:
    """img/s per core of each path, medians over interleaved rounds."""
    settings = {**spec, **(spec.get("quick", {}) if quick else {})}
    size, resize = case["image_size"], case["eval_resize"]
    bundle = imagenet(root=str(root), image_size=size, eval_resize=resize)
    train, evaluation = bundle.train, bundle.eval
    count = min(settings["images"], len(train))
    stride = len(train) / count  # spread over the classes
    indices = [int(i * stride) for i in range(count)]
    eval_indices = [i % len(evaluation) for i in indices]
    paths: dict[str, Callable[[int], object]] = {
        "train, old (full decode, float)": lambda i: baseline_train(train.path(i), size),
        "train, new (reduced decode, uint8)": lambda i: train.sample(i, None),
        "eval, old (full decode, float)": lambda i: baseline_eval(evaluation.path(i), size, resize),
        "eval, new (reduced decode, uint8)": lambda i: evaluation.sample(i, None),
    }
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    wall: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(settings["rounds"]):
        for name, fn in paths.items():
            chosen = eval_indices if name.startswith("eval") else indices
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            for i in chosen:
                fn(i)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    rows = {
        name: {
            "img_per_s_per_core": count / statistics.median(cpu[name]),
            "per_round": [count / max(t, 1e-9) for t in cpu[name]],
            "wall_img_per_s": count / statistics.median(wall[name]),
        }
        for name in paths
    }
    names = list(paths)
    speedup = {
        "train": rows[names[1]]["img_per_s_per_core"] / rows[names[0]]["img_per_s_per_core"],
        "eval": rows[names[3]]["img_per_s_per_core"] / rows[names[2]]["img_per_s_per_core"],
    }
    return {
        "case": case["name"],
        "kind": TRANSFORMS,
        "images": count,
        "rounds": settings["rounds"],
        "image_size": size,
        "eval_resize": resize,
        "paths": rows,
        "speedup": speedup,
    }


def _metric_median(run_dir: Path, key: str, skip_steps: int) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [r[key] for r in records if key in r and r.get("step", 0) > skip_steps]
    return statistics.median(values) if values else None


def _merge(*lists: list[str]) -> list[str]:
    """Overrides of all lists, a later value of a key replacing an earlier one in place."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for item in overrides:
            merged[item.split("=", 1)[0]] = item
    return list(merged.values())


def run_trainer_case(
    case: dict[str, Any], root: Path, out: Path, common: list[str], extra: list[str]
) -> dict[str, Any]:
    """One training run; its data-wait fraction and images/s, or why they are missing."""
    run_dir = out / "runs" / case["name"].replace(" ", "_")
    overrides = _merge(common, case["overrides"], extra, [f"data.root={root}"])
    command = [sys.executable, "-m", "secondorder.train", *overrides]
    command += [f"trainer.run_dir={run_dir}", "logger=none"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    result: dict[str, Any] = {"case": case["name"], "overrides": overrides}
    summary = read_json(run_dir / "summary.json")
    if done.returncode != 0 or summary is None:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        lines = [line for line in lines if "HYDRA_FULL_ERROR" not in line]
        reason = next((line for line in lines if line.startswith("error:")), None)
        reason = reason or next((line for line in reversed(lines) if "Error" in line), "")
        result["note"] = f"run failed (exit {done.returncode}): {reason.strip()}"
        return result
    result["steps"] = summary.get("steps")
    result["global_batch_size"] = summary.get("global_batch_size")
    fraction = summary.get("mean_data_wait_fraction")
    result["mean_data_wait_fraction"] = fraction
    if fraction is None:
        result["note"] = (
            "the summary has no mean_data_wait_fraction: this trainer does not record data "
            "waits yet"
        )
    images = _metric_median(run_dir, "images_per_s", skip_steps=2)
    if images is not None:
        result["images_per_s"], result["images_per_s_source"] = images, "metrics (median)"
    elif summary.get("wall_s"):
        result["images_per_s"] = summary["samples_seen"] / summary["wall_s"]
        result["images_per_s_source"] = "samples_seen / wall_s (start-up and evaluation included)"
    return result


def main(
    *, out: Path, quick: bool, command: str, only: str | None = None, report_only: bool = False
) -> int:
    """Measure the suite's cases (``only``: some of their names, e.g. ``transforms 224px``) and
    write the report; cases in ``out/results.json`` that this run does not repeat are kept."""
    from benchmarks.input_pipeline_report import write_input_pipeline_report

    spec = yaml.safe_load((HERE / "suites" / "input_pipeline.yaml").read_text())
    trainer = spec["trainer"]
    transforms = [
        {"name": f"transforms {s['image_size']}px", "kind": TRANSFORMS, **s}
        for s in spec["transforms"]["sizes"]
    ]
    cases = [*transforms, *trainer["cases"]]
    names = [c["name"] for c in cases]
    if report_only:
        cases = []
    elif quick:
        cases = [c for c in cases if not c.get("gpu")]
    if only:
        cases = [c for c in cases if c["name"] in only.split(",")]
    if any(c.get("gpu") for c in cases) and not torch.cuda.is_available():
        print("gpu cases skipped: CUDA is not available on this machine")
        cases = [c for c in cases if not c.get("gpu")]
    results = [r for r in read_json(out / "results.json") or [] if r["case"] in names]
    root = generated_folder(spec["quick_folder" if quick else "folder"]) if cases else None
    extra = trainer["quick_overrides"] if quick else []
    for case in cases:  # written after every case: a stopped suite keeps what finished
        if case.get("kind") == TRANSFORMS:
            result = measure_transforms(root, spec["transforms"], case, quick=quick)
        else:
            result = run_trainer_case(case, root, out, trainer["common"], extra)
        result.update(command=command, machine=machine(), folder=root.name)
        results = [r for r in results if r["case"] != case["name"]] + [result]
        results.sort(key=lambda r: names.index(r["case"]))
        write_json(out / "results.json", results)
        print(f"case {case['name']} done", flush=True)
    readme = write_input_pipeline_report(results, out, quick=quick, spec=spec)
    print(readme.read_text())
    return 0
