"""Reports of the parallel-efficiency tool: a result (the dict that ``measure`` or ``project``
builds) becomes ``<name>.json`` (everything), ``<name>.md`` (the table, the per-kind bytes and
the projection with its parameters) and ``<name>.png`` (measured step time split into compute /
communication / optimizer + other with the efficiency on top, and the projected efficiency
against the number of GPUs). ``python -m secondorder.scaling report <name>.json`` rebuilds the
last two from the first alone.

Plots need matplotlib, an optional extra (``pip install 'secondorder[plots]'``); it is imported
only where a plot is drawn (:func:`pyplot`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLOTS_MISSING = (
    "error: plots need matplotlib, an optional extra: pip install 'secondorder[plots]' "
    "(in a checkout: pip install -e '.[plots]')"
)


def pyplot() -> Any:
    """``matplotlib.pyplot`` drawing to files (the Agg backend); without matplotlib, a one-line
    message that names the extra to install (a SystemExit, so a command stops with it)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SystemExit(PLOTS_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.4g} MB"


def markdown(result: dict[str, Any]) -> str:
    """The result's ``<name>.md``."""
    lines = [f"# {result['name']}", "", f"Command: `{result['command']}`", ""]
    if result["kind"] == "measured":
        lines += _measured(result)
    else:
        counted = result["counted"]
        lines += [
            f"Bytes per step counted by: `{counted.get('command', 'a measured run')}` "
            f"({counted['bytes_per_step']:.0f} B = {_mb(counted['bytes_per_step'])} per rank).",
            "",
        ]
        if result.get("assumptions"):
            lines += ["Assumptions:", ""] + [f"- {a}" for a in result["assumptions"]] + [""]
    if result.get("projection"):
        lines += _projected(result["projection"])
    return "\n".join(lines)


def _measured(result: dict[str, Any]) -> list[str]:
    host = result["host"]
    lines = [
        f"Measured: backend `{result['backend']}`, {result['scaling']} scaling, "
        f"overrides `{' '.join(result['overrides'])}`, {host['cpus']} CPUs, "
        f"{host['threads_per_rank']} thread(s) per rank, load average "
        f"{host.get('load_average_1m_at_end', float('nan')):.1f} at the end.",
        "",
        "| N | global batch | step (ms) | samples/s | compute (ms) | comm (ms) "
        "| same bytes alone (ms) | optimizer+other (ms) | bytes/step | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        eff = "n/a" if r["efficiency"] is None else f"{100 * r['efficiency']:.1f}%"
        lines.append(
            f"| {r['world_size']} | {r['global_batch']} | {1e3 * r['step_s']:.2f} "
            f"| {r['throughput']:.0f} | {1e3 * r['compute_s']:.2f} | {1e3 * r['comm_s']:.2f} "
            f"| {1e3 * r.get('isolated_comm_s', 0.0):.2f} "
            f"| {1e3 * r['other_s']:.2f} "
            f"| {r['bytes_per_step']:.0f} ({_mb(r['bytes_per_step'])}) | {eff} |"
        )
    lines += [
        "",
        "compute: forward + backward of one rank's micro-batches timed alone (fastest of the "
        "repeats); comm: time the ranks were blocked in collectives (transfer plus waiting "
        "for the slower rank); same bytes alone: the step's counted all-reduce bytes "
        "all-reduced in isolation after a barrier (the transfer itself); optimizer+other: "
        "step - compute - comm (update, curvature work, data loading, interference).",
        "",
    ]
    for r in result["rows"]:
        if r["world_size"] > 1:
            parts = ", ".join(
                f"{k} {v['bytes']:.1f} B in {v['calls']:.2f} calls"
                for k, v in r["traffic"].items()
                if v["calls"]
            )
            lines.append(f"- N={r['world_size']} per step and rank: {parts}.")
    return [*lines, ""]


def _overlap_text(proj: dict[str, Any]) -> str:
    if proj.get("hidden_fraction") is None:
        return f"overlap {proj['overlap']:.2f} of backward"
    return (
        f"measured share of communication hidden by overlap {proj['hidden_fraction']:.2f}, "
        "at most backward"
    )


def _projected(proj: dict[str, Any]) -> list[str]:
    net = proj["network"]
    lines = [
        "Projection (ring all-reduce alpha-beta model, secondorder/scaling/cost_model.py): "
        f"compute {1e3 * proj['compute_s']:.2f} ms/step, "
        f"optimizer {1e3 * proj['optimizer_s']:.2f} ms/step, "
        f"bus bandwidth {net['bus_bw_intra'] / 1e9:.0f} GB/s within "
        f"{net['gpus_per_node']}-GPU nodes and {net['bus_bw_inter'] / 1e9:.0f} GB/s across, "
        f"alpha {net['alpha_intra'] * 1e6:.0f}/{net['alpha_inter'] * 1e6:.0f} us, "
        f"{_overlap_text(proj)} ({proj['backward_fraction']:.2f} of compute).",
        "",
        "| N | comm (ms) | exposed comm (ms) | step (ms) | efficiency |",
        "|---|---|---|---|---|",
    ]
    for r in proj["rows"]:
        lines.append(
            f"| {r['world_size']} | {1e3 * r['comm_s']:.3f} | {1e3 * r['exposed_comm_s']:.3f} "
            f"| {1e3 * r['step_s']:.2f} | {100 * r['efficiency']:.1f}% |"
        )
    return [*lines, ""]


def plot(result: dict[str, Any], path: Path) -> None:
    """The result's ``<name>.png``: the measured split (if measured) and the projection."""
    plt = pyplot()
    measured = result["kind"] == "measured"
    proj = result.get("projection")
    panels = int(measured) + int(proj is not None)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax_iter = iter(axes[0])
    if measured:
        _plot_measured(next(ax_iter), result)
    if proj is not None:
        ax = next(ax_iter)
        sizes = [r["world_size"] for r in proj["rows"]]
        ax.plot(sizes, [100 * r["efficiency"] for r in proj["rows"]], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs N")
        ax.set_ylabel("projected efficiency (%)")
        ax.set_ylim(0, 105)
        ax.axvline(proj["network"]["gpus_per_node"], color="gray", linestyle=":")
        ax.set_title("alpha-beta projection (weak scaling)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(result["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_measured(ax: Any, result: dict[str, Any]) -> None:
    rows = result["rows"]
    labels = [str(r["world_size"]) for r in rows]
    bottom = [0.0] * len(rows)
    for key, label in (
        ("compute_s", "compute"),
        ("comm_s", "communication"),
        ("other_s", "optimizer + other"),
    ):
        values = [max(0.0, 1e3 * r[key]) for r in rows]  # a noisy residual can dip below 0
        ax.bar(labels, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xlabel("ranks N")
    ax.set_ylabel("ms per step")
    ax.set_title(f"measured ({result['backend']}, {result['scaling']} scaling)")
    for i, r in enumerate(rows):
        if r["efficiency"] is not None:
            ax.annotate(f"{100 * r['efficiency']:.0f}%", (i, bottom[i]), ha="center", va="bottom")
    ax.legend()


def write_outputs(result: dict[str, Any], out: Path, name: str) -> None:
    """``<name>.json``, ``.md`` and ``.png`` of a new result in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rebuild(out / f"{name}.json")
    print(markdown(result))
    print(f"[scaling] wrote {out / name}.{{json,md,png}}")


def is_result(path: Path) -> bool:
    """Whether ``path`` is a result JSON of this tool (a folder may hold other JSON files)."""
    try:
        return json.loads(path.read_text()).get("kind") in ("measured", "projected")
    except (json.JSONDecodeError, AttributeError):
        return False


def rebuild(path: Path) -> None:
    """``<name>.md`` and ``<name>.png`` next to the result ``<name>.json``, from it alone."""
    result = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(result))
    plot(result, path.with_suffix(".png"))
