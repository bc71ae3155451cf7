"""Communication counters and the parameter fingerprint used by every communicator.

``comm.stats`` (:class:`CommStats`) counts calls, payload bytes and seconds of the collectives a
rank took part in; the parallel-efficiency tool (``python -m secondorder.scaling``) reads them
from ``comm_stats.rank<r>.json``, which a communicator writes at shutdown when
``$SECONDORDER_COMM_STATS`` names a directory. :func:`parameter_fingerprint` backs
``Communicator.verify_parameters`` (``distributed.verify_every``).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

#: Set to a directory to make every communicator write ``comm_stats.rank<r>.json`` there at
#: shutdown, with one record per gradient all-reduce interval (see :class:`CommStats`).
STATS_ENV = "SECONDORDER_COMM_STATS"
KINDS = ("all_reduce", "broadcast", "all_gather", "object")


class CommStats:
    """Calls, payload bytes and seconds of the collectives one rank took part in.

    ``bytes`` is what this rank contributes: ``numel * element_size`` of the tensor it reduces,
    broadcasts or gathers (the pickled size for object collectives). ``seconds`` is the wall time
    this rank spent blocked in collectives (the call itself plus ``wait()`` of async handles),
    i.e. the communication time not hidden behind other work.

    With ``intervals=True`` the counters are also split into intervals that each start at a
    gradient all-reduce (:meth:`Communicator.all_reduce_gradients`), i.e. one record per
    closure evaluation: the per-step traffic of a run, apart from setup before the first
    gradient all-reduce.
    """

    def __init__(self, *, intervals: bool = False):
        self.totals = self._empty()
        self.keep_intervals = intervals
        self.setup = self._empty()
        self.intervals: list[dict[str, dict[str, float]]] = []

    @staticmethod
    def _empty() -> dict[str, dict[str, float]]:
        return {k: {"calls": 0, "bytes": 0, "seconds": 0.0} for k in KINDS}

    def record(self, kind: str, *, nbytes: int = 0, seconds: float = 0.0, calls: int = 1) -> None:
        for target in (self.totals, self._current()):
            if target is not None:
                entry = target[kind]
                entry["calls"] += calls
                entry["bytes"] += nbytes
                entry["seconds"] += seconds

    def begin_interval(self) -> None:
        if self.keep_intervals:
            self.intervals.append(self._empty())

    def _current(self) -> dict[str, dict[str, float]] | None:
        if not self.keep_intervals:
            return None
        return self.intervals[-1] if self.intervals else self.setup

    @property
    def bytes(self) -> int:
        return sum(int(v["bytes"]) for v in self.totals.values())

    @property
    def seconds(self) -> float:
        return sum(float(v["seconds"]) for v in self.totals.values())

    def as_dict(self) -> dict[str, Any]:
        return {"totals": self.totals, "setup": self.setup, "intervals": self.intervals}


class Timed:
    """Wraps a backend handle's ``wait`` so the time blocked in it is counted."""

    def __init__(self, wait: Callable[[], Any], stats: CommStats, kind: str):
        self._wait, self._stats, self._kind = wait, stats, kind
        self._done = False

    def wait(self) -> None:
        if self._done:
            return None
        start = time.perf_counter()
        self._wait()
        self._stats.record(self._kind, seconds=time.perf_counter() - start, calls=0)
        self._done = True
        return None


def nbytes_of(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def pickled_size(obj: Any) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def parameter_fingerprint(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per tensor ``[sum(x), sum(i * x)]`` in float64, concatenated (on the tensors' device)."""
    parts = []
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        parts.append(torch.stack([flat.sum(), (flat * weights).sum()]))
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(parts)
