"""The work of K-FAC's inversion workers: damped decompositions of a factor snapshot.

Ba, Grosse & Martens 2017, "Distributed Second-Order Optimization using Kronecker-Factored
Approximations", section 5 ("asynchronous inversion"). :func:`invert_factors` is a pure
function of the snapshot, run by the generic executor (:mod:`secondorder.distributed.workers`)
in a worker process or, in ``sync`` mode, in the training process. It uses the same
:func:`~.inverse.damping_shifts` and :func:`~.inverse.decompose_factors` as synchronous K-FAC,
so on CPU the numbers are equal. :func:`inversion_job` describes the tensors of one worker's
share of the factors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from secondorder.distributed.workers import Job
from secondorder.optim.kfac.exchange import CurvatureLayout
from secondorder.optim.kfac.inverse import damping_shifts, decompose_factors, decomposition_keys

__all__ = ["ABSENT", "FAILED", "OK", "invert_factors", "inversion_job"]

# Per-item status in a result: no factors yet, decomposition failed (keep the previous), done.
ABSENT, FAILED, OK = -1.0, 0.0, 1.0

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def inversion_job(items: list[tuple[int, str]], layout: CurvatureLayout) -> Job:
    """The job decomposing ``items`` (``(layer, factor)``): every factor of the layers
    involved goes in (the damping shifts need a layer's traces), decompositions come out."""
    method, dtype = layout.method, layout.dtype
    involved = sorted({i for i, _ in items})
    info = {
        f"L{i}": {
            "names": list(layout.layers[i].factor_dims),
            "has_bias": layout.layers[i].has_bias,
            "double": layout.layers[i].double,
        }
        for i in involved
    }
    inputs: Spec = {"damping": ((), torch.float64)}
    outputs: Spec = {"status": ((len(items) + 2,), torch.float64)}
    for i in involved:
        inputs[f"L{i}.present"] = ((), torch.float64)
        for name, n in layout.layers[i].factor_dims.items():
            inputs[f"L{i}.{name}"] = ((n, n), dtype)
        if info[f"L{i}"]["double"] and layout.layers[i].has_bias and method == "inverse":
            outputs[f"L{i}.bias_inv"] = ((), dtype)
    for i, name in items:
        n = layout.layers[i].factor_dims[name]
        for key in decomposition_keys(name, method):
            square = key.startswith("Q_") or key.endswith("_inv")
            outputs[f"L{i}.{key}"] = ((n, n) if square else (n,), dtype)
    options = {"items": [(f"L{i}", name) for i, name in items], "layers": info, "method": method}
    return Job(invert_factors, inputs, outputs, options)


def invert_factors(inputs: dict[str, Tensor], options: dict[str, Any]) -> dict[str, Tensor]:
    """Decompose the factors ``options["items"]`` of a snapshot (pure; runs in a worker).

    Args:
        inputs: ``"L{i}.{A|G|K|Psi}"`` factors of every layer an item belongs to,
            ``"L{i}.present"`` (1: the layer has factors) and ``"damping"`` (λ, 0-d).
        options: ``items`` [(layer key, factor name)], ``layers`` {layer key: {"names",
            "has_bias", "double"}} and ``method`` (``eigen`` | ``inverse``).

    Returns:
        ``"L{i}.{Q_A|d_A|A_inv|...}"`` per item (identity where it failed or is absent),
        ``"L{i}.bias_inv"`` for doubly-factored layers with a bias (``inverse``), and
        ``"status"``: per item 1 (ok), 0 (failed: keep the previous one), −1 (no factors yet),
        then this snapshot's retries and failures.
    """
    method, items, layers = options["method"], options["items"], options["layers"]
    damping = float(inputs["damping"])
    present = {key for key in layers if float(inputs[f"{key}.present"]) > 0}
    out: dict[str, Tensor] = {}
    shifts, retry_shifts = {}, {}
    for key in present:
        info = layers[key]
        factors = {name: inputs[f"{key}.{name}"] for name in info["names"]}
        shifts[key] = damping_shifts(factors, has_bias=info["has_bias"], damping=damping)
        retry_shifts[key] = damping_shifts(factors, has_bias=info["has_bias"], damping=10 * damping)
        if info["double"] and info["has_bias"] and method == "inverse":
            dtype = factors["G"].dtype
            out[f"{key}.bias_inv"] = (1.0 / (1.0 + shifts[key]["bias"])).to(dtype)
    todo = [j for j, (key, _) in enumerate(items) if key in present]
    args = (
        [inputs[f"{items[j][0]}.{items[j][1]}"] for j in todo],
        [shifts[items[j][0]][items[j][1]] for j in todo],
        [retry_shifts[items[j][0]][items[j][1]] for j in todo],
    )
    results, retries, failures = decompose_factors(*args, [None] * len(todo), method=method)
    status = [ABSENT] * len(items)
    for j in todo:
        status[j] = OK
    if failures:  # rare: find out which items failed, one at a time
        results, retries, failures = [], 0, 0
        for j, factor, shift, retry in zip(todo, *args, strict=True):
            result, r, f = decompose_factors([factor], [shift], [retry], [None], method=method)
            results.append(result[0])
            retries, failures = retries + r, failures + f
            status[j] = FAILED if f else OK
    _fill_outputs(out, inputs, options, dict(zip(todo, results, strict=True)))
    out["status"] = torch.tensor([*status, float(retries), float(failures)], dtype=torch.float64)
    return out


def _fill_outputs(
    out: dict[str, Tensor],
    inputs: dict[str, Tensor],
    options: dict[str, Any],
    done: dict[int, tuple[Tensor, ...]],
) -> None:
    """Every output slot gets a value: the decomposition, or identity for an absent layer."""
    method, items, layers = options["method"], options["items"], options["layers"]
    for j, (key, name) in enumerate(items):
        factor = inputs[f"{key}.{name}"]
        n = factor.shape[0]
        identity = torch.eye(n, dtype=factor.dtype, device=factor.device)
        fill = (identity, torch.ones(n, dtype=factor.dtype, device=factor.device))
        for k, name_key in enumerate(decomposition_keys(name, method)):
            out[f"{key}.{name_key}"] = done[j][k] if j in done else fill[k]
    for key, info in layers.items():  # absent layers still fill their slot
        if info["double"] and info["has_bias"] and method == "inverse":
            out.setdefault(f"{key}.bias_inv", torch.ones((), dtype=inputs[f"{key}.G"].dtype))
