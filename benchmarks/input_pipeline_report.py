"""Report of the ``input_pipeline`` suite from its ``results.json`` alone: the transform table
(old against new path, img/s per core), the trainer table (data-wait fraction, images/s) and one
plot of both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.cost_report import _header
from benchmarks.report import write_readme
from secondorder.scaling.report import pyplot

TRANSFORMS = "transforms"


def transform_table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['case']}: {result['images']} images per round, {result['rounds']} rounds, "
        f"image_size {result['image_size']}, eval_resize {result['eval_resize']}; one "
        "single-threaded process.",
        "",
        "| path | img/s per core (median) | per-round img/s per core | wall img/s | new / old |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["paths"].items():
        part = name.split(",")[0]
        ratio = f"**{result['speedup'][part]:.2f}x**" if ", new" in name else "1.00x (baseline)"
        rounds = ", ".join(f"{x:.0f}" for x in row["per_round"])
        lines.append(
            f"| {name} | {row['img_per_s_per_core']:.0f} | {rounds} | "
            f"{row['wall_img_per_s']:.0f} | {ratio} |"
        )
    return lines


def _cell(value: float | None, fmt: str) -> str:
    return "not recorded" if value is None else format(value, fmt)


def trainer_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| trainer case | steps | global batch | mean data-wait fraction | images/s | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        source = f" ({r['images_per_s_source']})" if "images_per_s_source" in r else ""
        lines.append(
            f"| {r['case']} | {r.get('steps', '-')} | {r.get('global_batch_size', '-')} | "
            f"{_cell(r.get('mean_data_wait_fraction'), '.1%')} | "
            f"{_cell(r.get('images_per_s'), '.1f')}{source} | {r.get('note', '')} |"
        )
    return lines


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    transforms = [r for r in results if r.get("kind") == TRANSFORMS]
    trainer = [r for r in results if r.get("kind") != TRANSFORMS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    left, right = axes[0]
    width = 0.8 / max(1, len(transforms))
    for k, r in enumerate(transforms):
        names = list(r["paths"])
        values = [r["paths"][n]["img_per_s_per_core"] for n in names]
        positions = [i + (k - (len(transforms) - 1) / 2) * width for i in range(len(names))]
        left.bar(positions, values, width=width, label=r["case"])
        left.set_xticks(range(len(names)), [n.split(" (")[0] for n in names])
    if transforms:
        left.legend(fontsize=8)
    left.set_ylabel("images / s per CPU core")
    left.set_title("transforms: old vs new path")
    left.tick_params(axis="x", labelsize=7)
    labels = [r["case"].replace(" ", "\n", 2) for r in trainer]
    fractions = [100 * (r.get("mean_data_wait_fraction") or 0.0) for r in trainer]
    right.bar(labels, fractions, color="tab:orange")
    right.axhline(5.0, color="k", linestyle="--", linewidth=1, label="goal: 5%")
    right.set_ylabel("mean data wait, % of step time")
    right.set_title("trainer (0 where not recorded)")
    right.tick_params(axis="x", labelsize=7)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_input_pipeline_report(
    results: list[dict[str, Any]], out: Path, *, quick: bool, spec: dict[str, Any]
) -> Path:
    """README and plot of the suite."""
    plot(results, out / "input_pipeline.png")
    lines = _header("input_pipeline", quick, spec.get("description", ""), results)
    folders = sorted({r["folder"] for r in results if "folder" in r})
    if folders:
        lines += [f"Generated folder: {', '.join(folders)}", ""]
    for r in results:
        if r.get("kind") == TRANSFORMS:
            lines += [*transform_table(r), ""]
    trainer = [r for r in results if r.get("kind") != TRANSFORMS]
    if trainer:
        lines += [*trainer_table(trainer), ""]
    lines.append("![input pipeline](input_pipeline.png)")
    return write_readme(out, "\n".join(lines))
