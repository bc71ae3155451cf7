"""What the parallel-efficiency tool reads from a finished run: the step time from
``metrics.jsonl`` and the collectives from ``comm_stats.rank<r>.json``.

Bytes come only from the communicators' :class:`~secondorder.distributed.comm_stats.CommStats`
(the tensors they actually reduced, broadcast and gathered), never from a count an optimizer
computes by hand, so a collective is counted once and none is missed.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from secondorder.distributed.comm_stats import KINDS

FIELDS = ("bytes", "calls", "seconds")


def step_seconds(metrics_path: Path, *, warmup_steps: int) -> tuple[float, int]:
    """Seconds per step between the first and last logged steps past ``warmup_steps``."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    logged = [r for r in records if "lr" in r and r.get("step", 0) > warmup_steps]
    if len(logged) < 2:
        raise ValueError(
            f"{metrics_path}: need two logged steps after step {warmup_steps}; "
            "raise --steps or lower --log-every"
        )
    first, last = logged[0], logged[-1]
    steps = last["step"] - first["step"]
    return (last["elapsed_s"] - first["elapsed_s"]) / steps, steps


def step_traffic(stats_dir: Path, world_size: int, *, warmup_steps: int) -> dict[str, Any]:
    """Per-step collectives of every rank, averaged over steady intervals and ranks.

    Intervals (one per gradient all-reduce) past ``warmup_steps`` are used, except the last,
    which also holds the closing evaluation. Bytes are exact counts; seconds are blocked time.
    """
    per_rank = []
    for rank in range(world_size):
        path = stats_dir / f"comm_stats.rank{rank}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: did the run finish?")
        intervals = json.loads(path.read_text())["intervals"][:-1]
        window = intervals[warmup_steps:] or intervals
        if not window:
            raise ValueError(f"{path}: no complete step was recorded")
        per_rank.append(
            {
                kind: {f: statistics.fmean(float(i[kind][f]) for i in window) for f in FIELDS}
                for kind in KINDS
            }
        )
    traffic = {
        kind: {f: statistics.fmean(r[kind][f] for r in per_rank) for f in FIELDS} for kind in KINDS
    }
    return {
        "traffic": traffic,
        "bytes_per_step": sum(t["bytes"] for t in traffic.values()),
        "comm_s": sum(t["seconds"] for t in traffic.values()),
    }


def no_traffic() -> dict[str, Any]:
    """The collectives of a one-rank run: none."""
    zero = {k: dict.fromkeys(FIELDS, 0.0) for k in KINDS}
    return {"traffic": zero, "bytes_per_step": 0.0, "comm_s": 0.0, "isolated_comm_s": 0.0}
