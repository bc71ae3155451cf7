"""What a suite's ``results.json`` records besides the summaries, and how it is written.

The run folders of a suite (``<out>/runs/``) stay on the machine that ran it (they are
git-ignored); ``results.json`` alone must rebuild the suite's tables and plots. So it holds, next
to each trial's summary, the curve its plot draws (:func:`curve_of`), and the command and the
machine that produced it (:func:`machine`). Lists of numbers are written on one line each
(:func:`write_json`), which keeps a file of a few hundred curves readable and small.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

_NUMBER = r"-?(?:\d[\d.eE+-]*|NaN|Infinity)"
# A list of numbers as json.dumps(indent=...) lays it out, one element a line; a string never
# holds a raw line break, so text inside strings ("data.shape=[3,32,32]") is left as it is.
_NUMBER_LIST = re.compile(rf"\[\n\s*{_NUMBER}(?:,\n\s*{_NUMBER})*\n\s*\]")


def machine() -> str:
    """CPU model, torch threads and cores, GPU, torch and Python versions of this process."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads of {cores} cores, {gpu}, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def curve_of(run_dir: str | Path, metric: str) -> dict[str, list[float]]:
    """``metric`` at every evaluation of a run with its step and wall time, from the run's
    ``metrics.jsonl``; wall time to 0.1 ms and values to 8 significant digits, far below what
    a plot resolves."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if metric in r]
    return {
        "step": [r["step"] for r in records],
        "elapsed_s": [round(r["elapsed_s"], 4) for r in records],
        metric: [float(f"{r[metric]:.8g}") for r in records],
    }


def write_json(path: Path, data: Any) -> None:
    """``data`` indented, with every list of numbers on one line."""
    text = json.dumps(data, indent=2)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.findall(_NUMBER, m.group())) + "]", text)
    path.write_text(text + "\n")


def read_json(path: Path) -> Any:
    """The JSON in ``path``; ``None`` where there is no readable file."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
