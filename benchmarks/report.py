"""Turn a suite's ``results.json`` into a README table and PNG plots, from that file alone.

A README is the generated report followed by notes written by hand (findings, how a suite was
run), below the line :data:`NOTES`; a new report keeps them (:func:`write_readme`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from secondorder.scaling.report import pyplot

NOTES = "<!-- Notes below this line are written by hand; a new report keeps them. -->"


def write_readme(out: Path, generated: str) -> Path:
    """``out/README.md``: ``generated``, then the notes of the README already there."""
    path = out / "README.md"
    old = path.read_text() if path.is_file() else ""
    notes = old.split(NOTES, 1)[1] if NOTES in old else "\n"
    path.write_text(generated.rstrip("\n") + "\n\n" + NOTES + notes)
    return path


def spread(values: list[float | None]) -> tuple[float | None, float | None, float | None]:
    """Median, min and max of the reached values; ``None`` when any seed missed."""
    if not values or any(v is None for v in values):
        return None, None, None
    return statistics.median(values), min(values), max(values)


def fmt(
    stat: tuple[float | None, float | None, float | None],
    digits: int = 0,
    missing: str = "not reached",
) -> str:
    median, low, high = stat
    if median is None:
        return missing
    if digits == 0:
        return f"{median:.0f} [{low:.0f}-{high:.0f}]"
    return f"{median:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


STEP_COST = Path(__file__).resolve().parent / "results" / "step_cost" / "results.json"


def step_costs(path: Path = STEP_COST) -> dict[str, float]:
    """Measured step time relative to SGD, by ``"<case>/<label>"``, from the step-cost suite's
    committed results (empty where there are none)."""
    try:
        cases = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {
        f"{case['case']}/{label}": float(entry["ratio_vs_baseline"])
        for case in cases
        for label, entry in case["optimizers"].items()
    }


def summarize(
    results: dict[str, Any], costs: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """One row per (sweep point, optimizer): the best configuration's statistics over seeds.

    Samples to target are steps x global batch; gradient-equivalents are steps x the
    optimizer's step time in SGD steps (one SGD step = one gradient), as the step-cost suite
    measured it on the same model (``cost`` in the suite file), ``None`` where it was not."""
    costs = step_costs() if costs is None else costs
    rows = []
    for point in results["points"]:
        for name, entry in point["optimizers"].items():
            seeds = entry["seeds"]
            ratio = costs.get(entry.get("cost") or "")
            steps = [s["steps_to_target"] for s in seeds]
            rows.append(
                {
                    "point": point["point"],
                    "optimizer": name,
                    "best": entry["best"],
                    "trials": len(entry["trials"]),
                    "seeds": len(seeds),
                    "steps": spread(steps),
                    "steps_per_seed": steps,
                    "samples": spread(
                        [
                            None if n is None else n * s["global_batch_size"]
                            for n, s in zip(steps, seeds, strict=True)
                        ]
                    ),
                    "cost_ratio": ratio,
                    "gradients": spread(
                        [None if n is None or ratio is None else n * ratio for n in steps]
                    ),
                    "wall": spread([s["wall_to_target_s"] for s in seeds]),
                    "accuracy": spread([s["final_eval_accuracy"] for s in seeds]),
                    "loss": spread([s["final_eval_loss"] for s in seeds]),
                    "curve": seeds[0].get("curve") if seeds else None,
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| point | optimizer | best of grid | trials | seeds | steps to target | "
        "samples to target | gradient-equivalents to target | "
        "wall to target (s) | final eval accuracy | final eval loss |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        point = " ".join(f"{k}={v}" for k, v in r["point"].items()) or "-"
        best = " ".join(f"{k.split('.')[-1]}={v}" for k, v in r["best"].items())
        lines.append(
            f"| {point} | {r['optimizer']} | {best} | {r['trials']} | {r['seeds']} | "
            f"{_steps(r)} | {fmt(r['samples'])} | {_gradients(r)} | "
            f"{fmt(r['wall'], 1)} | {fmt(r['accuracy'], 3, '-')} | "
            f"{fmt(r['loss'], 4, '-')} |"
        )
    return "\n".join(lines)


def _steps(row: dict[str, Any]) -> str:
    """Median [min-max] steps; where some seeds missed, which seeds reached and in how many
    steps (the median counts a miss, so it stays "not reached")."""
    if row["steps"][0] is not None:
        return fmt(row["steps"])
    reached = [n for n in row["steps_per_seed"] if n is not None]
    if not reached:
        return "not reached"
    return (
        f"not reached ({len(reached)} of {row['seeds']} seeds did: "
        f"{', '.join(str(n) for n in reached)})"
    )


def _gradients(row: dict[str, Any]) -> str:
    if row["cost_ratio"] is None:
        return "-"
    return f"{fmt(row['gradients'])} ({row['cost_ratio']:.2f} per step)"


def plot_curves(rows: list[dict[str, Any]], path: Path, metric: str) -> None:
    """The metric against steps and against wall time, first seed of each best configuration."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # One colour per optimizer (up to 20 distinct), one line style per sweep point.
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    points = list(dict.fromkeys(" ".join(f"{v}" for v in r["point"].values()) for r in rows))
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for r in rows:
        curve = r["curve"] or {}
        if not curve.get(metric):
            continue
        point = " ".join(f"{v}" for v in r["point"].values())
        style = {
            "label": f"{r['optimizer']} {point}".strip(),
            "color": colours(names.index(r["optimizer"]) % 20),
            "linestyle": ("-", "--", ":", "-.")[points.index(point) % 4],
            "marker": "o",
            "markersize": 2.5,
        }
        axes[0].plot(curve["step"], curve[metric], **style)
        axes[1].plot(curve["elapsed_s"], curve[metric], **style)
    for ax, xlabel in zip(axes, ("step", "wall time (s), log scale"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")  # the slowest methods take 100x the fastest's time
    axes[0].legend(fontsize=7, ncol=2 if len(rows) > 12 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows: list[dict[str, Any]], path: Path, key: str) -> None:
    """Steps to target against batch size, log-log, with the perfect-scaling line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    by_opt: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["steps"][0] is not None:
            by_opt.setdefault(r["optimizer"], []).append((r["point"][key], r["steps"][0]))
    for name, points in by_opt.items():
        points.sort()
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
        b0, s0 = points[0]
        ax.plot([b0, points[-1][0]], [s0, s0 * b0 / points[-1][0]], ls=":", color="gray")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("steps to target (median)")
    ax.set_title("dotted: perfect scaling from each optimizer's smallest batch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling_efficiency(rows: list[dict[str, Any]], key: str) -> str:
    """``steps(b1) / steps(b2)`` relative to the perfect ``b2 / b1``, between consecutive batch
    sizes and from each batch size to the largest (the span a large-batch claim is about)."""
    lines = ["| optimizer | from batch | to batch | steps | efficiency |", "|---|---|---|---|---|"]
    by_opt: dict[str, list[tuple[int, float | None]]] = {}
    for r in rows:
        by_opt.setdefault(r["optimizer"], []).append((r["point"][key], r["steps"][0]))
    for name, points in by_opt.items():
        points.sort()
        pairs = list(zip(points, points[1:], strict=False))
        pairs += [(p, points[-1]) for p in points[:-2]]
        for (b1, s1), (b2, s2) in pairs:
            if s1 is None or s2 is None:
                eff = "target missed"
            else:
                eff = f"{(s1 / s2) / (b2 / b1):.0%}"
            lines.append(f"| {name} | {b1} | {b2} | {s1} -> {s2} | {eff} |")
    return "\n".join(lines)


def report_header(results: dict[str, Any], description: str, *, suite: str) -> list[str]:
    """A suite README's opening lines: title, description, command and machine (``commands``,
    where a suite ran in several parts, names each)."""
    commands = results.get("commands") or [results["command"]]
    return [
        f"# Benchmark: {suite}" + (" (quick)" if results["quick"] else ""),
        "",
        description.strip(),
        "",
        ("Command: " if len(commands) == 1 else "Commands: ")
        + "; ".join(f"`{c}`" for c in commands),
        "",
        f"Machine: {results['machine']}",
        "",
    ]


def write_report(results: dict[str, Any], out: Path, *, description: str, metric: str) -> Path:
    """README and plots of a time-to-target suite, from its results alone."""
    rows = summarize(results)
    plot_curves(rows, out / "curves.png", metric)
    parts = [
        *report_header(results, description, suite=results["suite"]),
        "Each optimizer gets the same number of trials on its grid (plain grids, see the suite "
        "file); the best trial (by the suite's metric) is re-run on every seed. Figures are "
        "median [min-max] over seeds. Samples to target = steps x global batch; "
        "gradient-equivalents = steps x the optimizer's step time in SGD steps on the same "
        "model, from the step-cost suite (`../step_cost/`, the case named by `cost` in the "
        "suite file; '-' where it has no such case).",
        "",
        table(rows),
        "",
        "![curves](curves.png)",
    ]
    sweep_keys = list(results["points"][0]["point"]) if results["points"] else []
    if sweep_keys:
        key = sweep_keys[0]
        plot_scaling(rows, out / "scaling.png", key)
        parts += [
            "",
            "## Scaling efficiency",
            "",
            scaling_efficiency(rows, key),
            "",
            "![scaling](scaling.png)",
        ]
    return write_readme(out, "\n".join(parts))
