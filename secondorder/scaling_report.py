"""Files of the parallel-efficiency tool (``python -m secondorder.scaling``): what it reads from a
run (``metrics.jsonl``, ``comm_stats.rank<r>.json``) and the reports it writes.

A result (the dict ``secondorder.scaling`` builds) becomes ``<name>.json`` (everything),
``<name>.md`` (the table, the per-kind bytes and the projection with its parameters) and
``<name>.png`` (measured step time split into compute / communication / optimizer + other with
the efficiency on top, and the projected efficiency against the number of GPUs).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from secondorder.distributed.comm_stats import KINDS

# -- reading a run's files -------------------------------------------------------------------


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


def reported_comm_bytes(metrics_path: Path) -> float | None:
    """Mean of an optimizer's ``comm_bytes`` diagnostic over logged steps, if it reports one."""
    values = []
    for line in metrics_path.read_text().splitlines():
        if line.strip() and "comm_bytes" in (record := json.loads(line)):
            values.append(float(record["comm_bytes"]))
    return statistics.fmean(values) if values else None


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
                kind: {
                    field: statistics.fmean(float(i[kind][field]) for i in window)
                    for field in ("bytes", "calls", "seconds")
                }
                for kind in KINDS
            }
        )
    traffic = {
        kind: {
            field: statistics.fmean(r[kind][field] for r in per_rank)
            for field in ("bytes", "calls", "seconds")
        }
        for kind in KINDS
    }
    return {
        "traffic": traffic,
        "bytes_per_step": sum(t["bytes"] for t in traffic.values()),
        "comm_s": sum(t["seconds"] for t in traffic.values()),
    }


def traffic_of(path: str) -> dict[str, dict[str, float]]:
    """Per-step traffic in a result JSON: the counted run's, else the largest measured N's."""
    source = json.loads(Path(path).read_text())
    if "counted" in source:
        return source["counted"]["traffic"]
    return max(source["rows"], key=lambda r: r["world_size"])["traffic"]


def amortized(
    counted: dict[str, dict[str, float]],
    baseline: dict[str, dict[str, float]],
    every: dict[str, int],
) -> dict[str, dict[str, float]]:
    """``baseline + (counted - baseline) / every[kind]`` per collective kind.

    For an optimizer counted with its periodic collectives on every step (e.g. K-FAC with
    ``factor_update_every=1 inverse_update_every=1``): its extra traffic over the baseline
    (SGD: gradients and loss) happens once every ``every[kind]`` steps in the real config.
    """
    out = json.loads(json.dumps(counted))
    for kind, period in every.items():
        for field in ("bytes", "calls"):
            extra = counted[kind][field] - baseline[kind][field]
            out[kind][field] = baseline[kind][field] + extra / period
    return out


# -- writing reports -----------------------------------------------------------------------------


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.4g} MB"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# {result['name']}", "", f"Command: `{result['command']}`", ""]
    if result["kind"] == "measured":
        lines += [
            f"Measured: backend `{result['backend']}`, {result['scaling']} scaling, "
            f"overrides `{' '.join(result['overrides'])}`, {result['host']['cpus']} CPUs, "
            f"{result['host']['threads_per_rank']} thread(s) per rank, load average "
            f"{result['host'].get('load_average_1m_at_end', float('nan')):.1f} at the end.",
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
        lines.append("")
    else:
        counted = result["counted"]
        lines += [
            f"Bytes per step counted by: `{counted.get('command', 'a measured run')}` "
            f"({counted['bytes_per_step']:.0f} B = {_mb(counted['bytes_per_step'])} per rank).",
            "",
        ]
        if result.get("assumptions"):
            lines += ["Assumptions:", ""] + [f"- {a}" for a in result["assumptions"]] + [""]
    proj = result.get("projection")
    if proj:
        net = proj["network"]
        lines += [
            "Projection (ring all-reduce alpha-beta model, secondorder/distributed/cost_model.py): "
            f"compute {1e3 * proj['compute_s']:.2f} ms/step, "
            f"optimizer {1e3 * proj['optimizer_s']:.2f} ms/step, "
            f"bus bandwidth {net['bus_bw_intra'] / 1e9:.0f} GB/s within "
            f"{net['gpus_per_node']}-GPU nodes and {net['bus_bw_inter'] / 1e9:.0f} GB/s across, "
            f"alpha {net['alpha_intra'] * 1e6:.0f}/{net['alpha_inter'] * 1e6:.0f} us, overlap "
            f"{proj['overlap']:.2f} of backward ({proj['backward_fraction']:.2f} of compute).",
            "",
            "| N | comm (ms) | exposed comm (ms) | step (ms) | efficiency |",
            "|---|---|---|---|---|",
        ]
        for r in proj["rows"]:
            lines.append(
                f"| {r['world_size']} | {1e3 * r['comm_s']:.3f} | {1e3 * r['exposed_comm_s']:.3f} "
                f"| {1e3 * r['step_s']:.2f} | {100 * r['efficiency']:.1f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = result["kind"] == "measured"
    proj = result.get("projection")
    panels = int(measured) + int(proj is not None)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax_iter = iter(axes[0])
    if measured:
        ax = next(ax_iter)
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
                ax.annotate(
                    f"{100 * r['efficiency']:.0f}%", (i, bottom[i]), ha="center", va="bottom"
                )
        ax.legend()
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


def write_outputs(result: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    plot(result, out / f"{name}.png")
    print(markdown(result))
    print(f"[scaling] wrote {out / name}.{{json,md,png}}")
