"""Reports of the cost suites (``step_cost``, ``gpu``, ``curvature_cost``) from their
``results.json`` alone: a list of cases, each with the command and the machine that measured it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report import write_readme
from secondorder.scaling.report import pyplot


def _header(suite: str, quick: bool, description: str, cases: list[dict[str, Any]]) -> list[str]:
    """Title, description, and the distinct commands and machines of the cases."""
    commands = list(dict.fromkeys(c.get("command", "not recorded") for c in cases))
    machines = list(dict.fromkeys(c.get("machine", "not recorded") for c in cases))
    return [
        f"# Benchmark: {suite}" + (" (quick)" if quick else ""),
        "",
        description.strip(),
        "",
        ("Commands: " if len(commands) > 1 else "Command: ")
        + "; ".join(f"`{c}`" for c in commands),
        "",
        ("Machines: " if len(machines) > 1 else "Machine: ") + "; ".join(machines),
        "",
    ]


def step_cost_table(results: list[dict[str, Any]], baseline: str) -> str:
    lines = [
        f"| case | optimizer | step (ms) | forward/backward (ms) | optimizer's own (ms) | "
        f"step / {baseline} (median) | per-round ratios |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        memory = f", peak {res['peak_memory_gb']:.1f} GiB" if "peak_memory_gb" in res else ""
        if res.get("threads") is not None:
            memory += f", {res['threads']} training thread{'s' if res['threads'] > 1 else ''}"
        for label, r in res["optimizers"].items():
            rounds = ", ".join(f"{x:.2f}" for x in r["ratio_per_round"])
            lines.append(
                f"| {res['case']} (batch {res['batch_size']}{memory}) | {label} | "
                f"{1e3 * r['step_s']:.1f} | {1e3 * r['forward_backward_s']:.1f} | "
                f"{1e3 * r['optimizer_s']:.1f} | "
                f"{r['ratio_vs_baseline']:.2f} | {rounds} |"
            )
    return "\n".join(lines)


def step_cost_plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        labels = list(res["optimizers"])
        fb = [1e3 * res["optimizers"][k]["forward_backward_s"] for k in labels]
        own = [1e3 * res["optimizers"][k]["optimizer_s"] for k in labels]
        ax.bar(labels, fb, label="forward/backward")
        ax.bar(labels, own, bottom=fb, label="optimizer's own work")
        ax.set_title(f"{res['case']} (batch {res['batch_size']})")
        ax.set_ylabel("ms per step")
        ax.tick_params(axis="x", rotation=45)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_step_cost_report(
    results: list[dict[str, Any]], out: Path, *, suite: str, quick: bool, spec: dict[str, Any]
) -> Path:
    """README and plot of the step-cost (or GPU) suite; the baseline is the suite's first
    optimizer."""
    step_cost_plot(results, out / "step_cost.png")
    baseline = spec["cases"][0]["optimizers"][0]["label"]
    lines = [
        *_header(suite, quick, spec.get("description", ""), results),
        step_cost_table(results, baseline),
        "",
        "![step cost](step_cost.png)",
    ]
    return write_readme(out, "\n".join(lines))


def write_curvature_cost_report(
    results: list[dict[str, Any]], out: Path, *, quick: bool, spec: dict[str, Any]
) -> Path:
    """README of the curvature-cost suite: every product's time and its ratio to a gradient."""
    lines = ["| case | product | ms | x gradient |", "|---|---|---|---|"]
    for r in results:
        for k, t in r["seconds"].items():
            lines.append(
                f"| {r['case']} (batch {r['batch_size']}) | {k} | {1e3 * t:.1f} | "
                f"{r['ratio_vs_gradient'][k]:.2f} |"
            )
    header = _header("curvature_cost", quick, spec.get("description", ""), results)
    return write_readme(out, "\n".join([*header, *lines]))
