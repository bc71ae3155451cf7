"""Ring all-reduce alpha-beta model of communication time, for projecting parallel efficiency.

Per step, for N ranks (Thakur, Rabenseifner & Gropp 2005, "Optimization of collective
communication operations in MPICH"; bus bandwidth as defined by NVIDIA's nccl-tests
PERFORMANCE.md, so measured ``busbw`` numbers plug in directly)::

    t_all_reduce = 2 (N-1)/N * B / bus_bw + 2 (N-1) * alpha * calls
    t_broadcast  =             B / bus_bw +   (N-1) * alpha * calls
    t_all_gather =       (N-1) * B / bus_bw + (N-1) * alpha * calls     (B: bytes per rank)
    T(N) = compute + optimizer + max(0, t_comm - overlap * backward_fraction * compute)
    or, from a measured hidden fraction h of communication (overlapped gradient all-reduce):
    T(N) = compute + optimizer + t_comm - min(h * t_comm, backward_fraction * compute)
    efficiency(N) = (compute + optimizer) / T(N)                          (weak scaling)

Symbols: ``B`` bytes per step of one collective kind as counted by the communicator
(:class:`~secondorder.distributed.comm_stats.CommStats`), ``calls`` collectives per step,
``bus_bw`` the bus bandwidth (intra-node up to ``gpus_per_node`` ranks, inter-node beyond),
``alpha`` the per-message latency of one ring step, ``overlap`` the fraction of backward time that
hides communication (0: gradients are all-reduced after backward, as the closure does now),
``backward_fraction`` backward's share of compute (about 2/3: backward costs two forwards),
``h`` the share of the gradient communication a measured run hid behind backward
(``benchmarks/results/overlap``): assumed to carry over to N ranks, never more than backward.
"""

from __future__ import annotations

from dataclasses import dataclass

# Defaults of the projection and their sources (see benchmarks/results/scaling/README.md).
#: 8xH100 SXM (NVLink 4 + NVSwitch) ring all-reduce bus bandwidth. nccl-tests reference runs
#: report 460-480 GB/s busbw at large sizes (Alaya NeW, "NCCL-tests in practice", 2026);
#: 370 GB/s (~80%) is a conservative value for bucket-sized (25 MB) messages.
BUS_BW_NVLINK = 370e9
#: Across nodes: one 400 Gb/s NDR InfiniBand NIC per GPU = 50 GB/s. Two-node H100 nccl-tests
#: reach 400-450 GB/s busbw with 8 NDR NICs per node (Saturn Cloud's NCCL validation guide) and
#: ~35 GB/s with 4 RoCE NICs (kubernetes.recipes): 50 GB/s sits at the conservative end.
BUS_BW_INFINIBAND = 50e9
#: Per-message latency of one ring step: NCCL small-message latencies are a few microseconds
#: within a node and ~10 us across InfiniBand.
ALPHA_NVLINK = 5e-6
ALPHA_INFINIBAND = 10e-6
PROJECTED_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Network:
    """Bus bandwidth (bytes/s) and latency (s) within a node and across nodes."""

    bus_bw_intra: float = BUS_BW_NVLINK
    bus_bw_inter: float = BUS_BW_INFINIBAND
    alpha_intra: float = ALPHA_NVLINK
    alpha_inter: float = ALPHA_INFINIBAND
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        for name in ("bus_bw_intra", "bus_bw_inter"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}")
        for name in ("alpha_intra", "alpha_inter"):
            if getattr(self, name) < 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}")
        if self.gpus_per_node < 1:
            raise ValueError(f"Invalid gpus_per_node: {self.gpus_per_node}")

    def link(self, world_size: int) -> tuple[float, float]:
        if world_size <= self.gpus_per_node:
            return self.bus_bw_intra, self.alpha_intra
        return self.bus_bw_inter, self.alpha_inter


def comm_seconds(traffic: dict[str, dict[str, float]], world_size: int, net: Network) -> float:
    """Ring-model time of one step's collectives; ``traffic[kind] = {"bytes", "calls"}``."""
    n = world_size
    if n == 1:
        return 0.0
    bw, alpha = net.link(n)
    total = 0.0
    for kind, entry in traffic.items():
        nbytes, calls = float(entry.get("bytes", 0.0)), float(entry.get("calls", 0.0))
        if kind == "all_reduce":
            total += 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * alpha * calls
        elif kind == "broadcast":
            total += nbytes / bw + (n - 1) * alpha * calls
        else:  # all_gather and object collectives: every rank receives N-1 contributions
            total += (n - 1) * nbytes / bw + (n - 1) * alpha * calls
    return total


def project(
    *,
    compute_s: float,
    optimizer_s: float,
    traffic: dict[str, dict[str, float]],
    net: Network,
    sizes: tuple[int, ...] = PROJECTED_SIZES,
    overlap: float = 0.0,
    backward_fraction: float = 2 / 3,
    hidden_fraction: float | None = None,
) -> list[dict[str, float]]:
    """Projected weak-scaling step time and efficiency for every size in ``sizes``; with
    ``hidden_fraction`` the exposed communication follows the measured share instead of
    ``overlap``."""
    if compute_s <= 0:
        raise ValueError(f"Invalid compute_s: {compute_s}")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"Invalid overlap: {overlap}")
    if hidden_fraction is not None and not 0.0 <= hidden_fraction <= 1.0:
        raise ValueError(f"Invalid hidden_fraction: {hidden_fraction}")
    base = compute_s + optimizer_s
    rows = []
    for n in sizes:
        t_comm = comm_seconds(traffic, n, net)
        if hidden_fraction is None:
            exposed = max(0.0, t_comm - overlap * backward_fraction * compute_s)
        else:
            exposed = t_comm - min(hidden_fraction * t_comm, backward_fraction * compute_s)
        step = base + exposed
        rows.append(
            {
                "world_size": n,
                "comm_s": t_comm,
                "exposed_comm_s": exposed,
                "step_s": step,
                "efficiency": base / step,
            }
        )
    return rows
