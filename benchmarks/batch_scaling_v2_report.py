"""Batch scaling v2's report: the per-batch table, the fits of S(B) and the log-log plot.

``S(B) = S_min (1 + B_crit / B)`` (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training"): ``S_min`` is the fewest steps any batch can reach the target in, ``B_crit`` the batch
where the steps are twice that, the end of the perfect-scaling region. The fit is least squares
in log space (steps to target vary by a factor, not by an amount) over every seed's point: for a
fixed ``B_crit`` the best ``log S_min`` is the mean of ``log S - log(1 + B_crit / B)``, so only
``B_crit`` is searched, on a fine log grid, which cannot fail or wander the way a general
optimiser can. Its 90% interval (and ``S_min``'s) comes from a bootstrap that resamples the
points with replacement. Everything is computed from ``results.json`` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import fmt, report_header, spread, write_readme
from secondorder.scaling.report import pyplot

#: log10 of the B_crit values searched; the ends stand for "no scaling" and "perfect scaling".
LOG_GRID = np.linspace(0.0, 8.0, 1601)
BOOTSTRAP = 1000
#: The comparison the suite exists for: the curvature method against the first-order baseline
#: and against the best of the maintained Shampoo-family optimizers, at this batch.
CURVATURE, FIRST_ORDER, SHAMPOO_FAMILY, COMPARE_AT = "kfac", "adamw", ("shampoo", "soap"), 32768


def fit_scaling(batches: list[float], steps: list[float]) -> tuple[float, float, float]:
    """``(S_min, B_crit, rms log residual)`` of ``S(B) = S_min (1 + B_crit / B)``."""
    b, log_s = np.asarray(batches, float), np.log(np.asarray(steps, float))
    shape = np.log1p(10.0 ** LOG_GRID[:, None] / b[None, :])  # (grid, points)
    log_s_min = (log_s[None, :] - shape).mean(axis=1)
    sse = ((log_s[None, :] - shape - log_s_min[:, None]) ** 2).mean(axis=1)
    best = int(np.argmin(sse))
    return float(np.exp(log_s_min[best])), float(10.0 ** LOG_GRID[best]), float(sse[best] ** 0.5)


def fit_with_intervals(points: list[tuple[int, int]], seed: int = 0) -> dict[str, Any] | None:
    """The fit over ``(batch, steps)`` points and its 5%-95% bootstrap intervals; ``None`` with
    fewer than 3 batch sizes reached."""
    if len({b for b, _ in points}) < 3:
        return None
    batches, steps = zip(*points, strict=True)
    s_min, b_crit, rms = fit_scaling(list(batches), list(steps))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(points), len(points))
        if len({batches[i] for i in pick}) >= 3:  # two batch sizes leave B_crit undetermined
            draws.append(fit_scaling([batches[i] for i in pick], [steps[i] for i in pick])[:2])
    low, high = np.percentile(np.asarray(draws), [5, 95], axis=0)
    return {
        "S_min": round(s_min, 2),
        "B_crit": round(b_crit, 1),
        "S_min_interval": [round(float(low[0]), 2), round(float(high[0]), 2)],
        "B_crit_interval": [round(float(low[1]), 1), round(float(high[1]), 1)],
        "rms_log_residual": round(rms, 4),
        "points": len(points),
        "batches": sorted({b for b, _ in points}),
        "at_grid_edge": bool(b_crit >= 10.0 ** LOG_GRID[-1] or b_crit <= 10.0 ** LOG_GRID[0]),
    }


def fits(results: dict[str, Any]) -> dict[str, Any]:
    """Per optimizer: the fit over every seed run that reached the target."""
    out = {}
    for opt, cells in results["optimizers"].items():
        points = [
            (int(batch), row["steps_to_target"])
            for batch, cell in cells.items()
            for row in cell["seeds"]
            if row["steps_to_target"] is not None
        ]
        fitted = fit_with_intervals(points)
        if fitted is not None:
            out[opt] = fitted
    return out


def cell_figures(cell: dict[str, Any]) -> dict[str, Any]:
    """Median (and range) over a cell's seed runs; steps and wall ``None`` when a seed missed."""
    seeds = cell["seeds"]
    steps = [r["steps_to_target"] for r in seeds]
    median, low, high = spread(steps)
    return {
        "steps": median,
        "range": (low, high),
        "wall": spread([r["wall_to_target_s"] for r in seeds])[0],
        "rate": spread([r["images_per_s"] for r in seeds])[0],
        "reached": sum(s is not None for s in steps),
    }


def markdown(results: dict[str, Any], figures: dict[str, dict[int, dict[str, Any]]]) -> str:
    opts = results["optimizers"]
    base = figures.get(FIRST_ORDER, {})
    lines = [
        *report_header(results, results["description"], suite=results["suite"]),
        f"Figures are median [min-max] over the seeds run ({len(results['seeds'])} planned). "
        "Trials: learning rate -> steps to target of the tuning runs (seed 0; 'x' = stopped "
        "at the best trial's steps or the cap without reaching it). Time per step against "
        "AdamW: median training throughput of the two at the same batch (evaluations excluded); "
        "gradient-equivalents = steps x that ratio.",
        "",
        "| optimizer | batch | trials (lr -> steps) | best lr | seeds reached | steps to target "
        "| samples to target | wall to target (s) | time per step vs AdamW "
        "| gradient-equivalents |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for opt, cells in opts.items():
        for batch, cell in cells.items():
            f = figures[opt][int(batch)]
            trials = ", ".join(
                f"{t['lr']:g} -> {t['steps_to_target'] if t['steps_to_target'] else 'x'}"
                for t in cell["trials"]
            )
            ratio = None
            if f["rate"] and base.get(int(batch), {}).get("rate"):
                ratio = base[int(batch)]["rate"] / f["rate"]
            steps = fmt((f["steps"], *f["range"]))
            samples = f["steps"] and f["steps"] * int(batch)
            equivalents = ratio and f["steps"] and ratio * f["steps"]
            lines.append(
                f"| {opt} | {batch} | {trials} | {cell['best_lr']:g} | {f['reached']}/"
                f"{len(cell['seeds'])} | {steps} | {_num(samples, '.3g')} | "
                f"{_num(f['wall'], '.1f')} | {_num(ratio, '.2f')} | {_num(equivalents, '.0f')} |"
            )
    lines += ["", "![steps against batch](scaling.png)", "", *fit_table(results["fits"])]
    lines += ["", *comparison(figures, results["fits"])]
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fit_table(fitted: dict[str, Any]) -> list[str]:
    lines = [
        "## Fits of S(B) = S_min (1 + B_crit / B)",
        "",
        "| optimizer | S_min [90% interval] | B_crit [90% interval] | rms log residual | points "
        "| batches |",
        "|---|---|---|---|---|---|",
    ]
    for opt, f in fitted.items():
        lo, hi = f["S_min_interval"]
        blo, bhi = f["B_crit_interval"]
        edge = " (at the search's edge)" if f["at_grid_edge"] else ""
        lines.append(
            f"| {opt} | {f['S_min']:.0f} [{lo:.0f}-{hi:.0f}] | {f['B_crit']:.0f}{edge} "
            f"[{blo:.0f}-{bhi:.0f}] | {f['rms_log_residual']:.3f} | {f['points']} | "
            f"{min(f['batches'])}-{max(f['batches'])} |"
        )
    return lines


def comparison(figures: dict[str, dict[int, dict[str, Any]]], fitted: dict[str, Any]) -> list[str]:
    """K-FAC against AdamW and the Shampoo family: the ratios the suite exists to measure."""
    ours, base = figures.get(CURVATURE, {}), figures.get(FIRST_ORDER, {})
    lines = [f"## {CURVATURE} against {FIRST_ORDER} and the Shampoo family", ""]
    if CURVATURE in fitted and FIRST_ORDER in fitted:
        ratio = fitted[CURVATURE]["B_crit"] / fitted[FIRST_ORDER]["B_crit"]
        lines.append(f"- fitted B_crit, {CURVATURE} / {FIRST_ORDER}: {ratio:.2f}")
    at_k, at_b = ours.get(COMPARE_AT), base.get(COMPARE_AT)
    if at_k and at_b and at_k["steps"] and at_b["steps"]:
        lines.append(
            f"- at batch {COMPARE_AT}, steps {CURVATURE} / {FIRST_ORDER}: "
            f"{at_k['steps']:.0f} / {at_b['steps']:.0f} = {at_k['steps'] / at_b['steps']:.2f}; "
            f"wall to target: {_num(at_k['wall'], '.1f')} s / {_num(at_b['wall'], '.1f')} s = "
            f"{_num(at_k['wall'] and at_b['wall'] and at_k['wall'] / at_b['wall'], '.2f')}"
        )
    family = {
        o: figures[o][COMPARE_AT]["steps"]
        for o in SHAMPOO_FAMILY
        if COMPARE_AT in figures.get(o, {})
    }
    reached = {o: s for o, s in family.items() if s is not None}
    if at_k and at_k["steps"] and reached:
        best = min(reached, key=reached.__getitem__)
        lines.append(
            f"- at batch {COMPARE_AT}, steps {CURVATURE} / best of the Shampoo family "
            f"({best}): {at_k['steps']:.0f} / {reached[best]:.0f} = "
            f"{at_k['steps'] / reached[best]:.2f}"
        )
    return lines


def plot(
    results: dict[str, Any], figures: dict[str, dict[int, dict[str, Any]]], path: Path
) -> None:
    """Steps to target against batch (log-log): median and range per point, each optimizer's
    fit (solid) and its perfect-scaling line from its smallest batch (dotted)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 5))
    for i, (opt, cells) in enumerate(figures.items()):
        color = f"C{i}"
        pts = [(b, f) for b, f in cells.items() if f["steps"] is not None]
        if not pts:
            continue
        xs = [b for b, _ in pts]
        ys = [f["steps"] for _, f in pts]
        lows = [f["steps"] - f["range"][0] for _, f in pts]
        highs = [f["range"][1] - f["steps"] for _, f in pts]
        axis.errorbar(xs, ys, yerr=[lows, highs], fmt="o", color=color, label=opt, capsize=3)
        axis.plot(xs, [ys[0] * xs[0] / x for x in xs], ":", color=color, alpha=0.6)
        fitted = results["fits"].get(opt)
        if fitted:
            grid = np.geomspace(min(xs), max(xs), 100)
            axis.plot(grid, fitted["S_min"] * (1 + fitted["B_crit"] / grid), "-", color=color)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("global batch")
    axis.set_ylabel("steps to target")
    axis.set_title("steps to target (dotted: perfect scaling; solid: fit)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(results: dict[str, Any], out: Path) -> None:
    """Adds ``results['fits']`` and writes ``README.md`` and ``scaling.png``."""
    results["fits"] = fits(results)
    figures = {
        opt: {int(b): cell_figures(c) for b, c in cells.items()}
        for opt, cells in results["optimizers"].items()
    }
    plot(results, figures, out / "scaling.png")
    write_readme(out, markdown(results, figures))
