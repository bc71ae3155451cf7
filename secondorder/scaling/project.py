"""Projection of parallel efficiency to many GPUs from a step's compute time and its traffic.

The traffic is what the communicators counted (:class:`~secondorder.distributed.comm_stats.
CommStats`): of a measured run, of a tiny 2-rank counting run of the same model and optimizer
(``--count``, see :func:`secondorder.scaling.measure.count_traffic`), or of an earlier result
(``--traffic``). The time model is :mod:`secondorder.scaling.cost_model`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from secondorder.distributed.comm_stats import KINDS
from secondorder.scaling.cost_model import Network, project

Traffic = dict[str, dict[str, float]]


def network(args: argparse.Namespace) -> Network:
    """The network of the command line (GB/s and microseconds there, bytes/s and s here)."""
    return Network(
        bus_bw_intra=args.bus_bw_intra * 1e9,
        bus_bw_inter=args.bus_bw_inter * 1e9,
        alpha_intra=args.alpha_intra * 1e-6,
        alpha_inter=args.alpha_inter * 1e-6,
        gpus_per_node=args.gpus_per_node,
    )


def projection(
    args: argparse.Namespace, *, compute_s: float, optimizer_s: float, traffic: Traffic
) -> dict[str, Any]:
    """The projected rows with every input they were computed from."""
    net = network(args)
    hidden = hidden_fraction(args)
    return {
        "compute_s": compute_s,
        "optimizer_s": optimizer_s,
        "traffic": traffic,
        "network": asdict(net),
        "overlap": args.overlap,
        "backward_fraction": args.backward_fraction,
        **({} if hidden is None else {"hidden_fraction": hidden}),
        "rows": project(
            compute_s=compute_s,
            optimizer_s=optimizer_s,
            traffic=traffic,
            net=net,
            sizes=tuple(args.sizes),
            overlap=args.overlap,
            backward_fraction=args.backward_fraction,
            hidden_fraction=hidden,
        ),
    }


def hidden_fraction(args: argparse.Namespace) -> float | None:
    """``--hidden-fraction``, or the ``hidden_fraction`` of ``--hidden-from``'s JSON (the
    overlap suite's ``results.json``); ``None`` when neither is given."""
    given = getattr(args, "hidden_fraction", None)
    source = getattr(args, "hidden_from", None)
    if given is not None and source:
        raise SystemExit("give --hidden-fraction or --hidden-from, not both")
    if source:
        value = json.loads(Path(source).read_text()).get("hidden_fraction")
        if not isinstance(value, (int, float)):
            raise SystemExit(f"--hidden-from: {source} holds no measured hidden_fraction")
        given = float(value)
    if given is not None and not 0.0 <= given <= 1.0:
        raise SystemExit(f"hidden fraction must be in [0, 1], got {given}")
    return given


def traffic_of(path: str) -> Traffic:
    """Per-step traffic in a result JSON: the counted run's, else the largest measured N's."""
    source = json.loads(Path(path).read_text())
    if "counted" in source:
        return source["counted"]["traffic"]
    return max(source["rows"], key=lambda r: r["world_size"])["traffic"]


def amortized(counted: Traffic, baseline: Traffic, every: dict[str, int]) -> Traffic:
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


def kind_period(text: str) -> tuple[str, int]:
    """``KIND=N`` of ``--extra-every``."""
    kind, _, period = text.partition("=")
    if kind not in KINDS or not period.isdigit() or int(period) < 1:
        raise SystemExit(f"--extra-every expects KIND=N with KIND in {KINDS}, got {text!r}")
    return kind, int(period)
