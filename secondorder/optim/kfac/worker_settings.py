"""K-FAC's ``workers`` config group: how many curvature workers, and how stale they may be.

Asynchronous curvature (Ba, Grosse & Martens 2017, section 5): inversion workers decompose the
factors and, optionally, statistics workers compute the factor statistics, in processes of their
own (:mod:`.async_curvature`, :mod:`.async_stats`; the processes themselves are
:mod:`secondorder.distributed.workers`). These dataclasses are that group's schema; their own
checks name the config key of a bad value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from secondorder.distributed.workers import available_cpus

__all__ = ["InversionSettings", "StatsSettings", "WorkersSettings"]


@dataclass
class InversionSettings:
    """``num_processes`` inversion processes per rank, ``threads`` torch threads each."""

    num_processes: int = 1
    threads: int = 1


@dataclass
class StatsSettings:
    """Statistics workers (``num_processes = 0``: the training step computes the factors).

    Each of the ``num_processes`` processes per rank (``threads`` torch threads each) holds a
    model replica whose parameters are refreshed from the rank every ``refresh_every`` steps,
    and computes factor statistics on its own mini-batches of ``batch_size`` examples.
    """

    num_processes: int = 0
    refresh_every: int = 10
    batch_size: int = 128
    threads: int = 1


@dataclass
class WorkersSettings:
    """The ``workers`` config group: ``mode`` none | sync | async and the pools' sizes.

    ``max_staleness``: steps the training rank may run before the inverses of the newest
    published factors are in use (0: wait at once, equal to ``sync``). ``heartbeat_s``: a
    worker silent for longer is stuck (it must exceed the longest single job).
    ``wait_timeout_s``: the longest wait for a worker before computing in-process.
    ``cpus``: CPU ids every worker process is bound to (e.g. cores the training process and
    the data loaders leave free); ``None``: no binding.
    """

    mode: Literal["none", "sync", "async"] = "none"
    inversion: InversionSettings = field(default_factory=InversionSettings)
    stats: StatsSettings = field(default_factory=StatsSettings)
    max_staleness: int = 10
    max_restarts: int = 3
    heartbeat_s: float = 30.0
    wait_timeout_s: float = 120.0
    cpus: list[int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("none", "sync", "async"):
            raise ValueError(f"Invalid workers.mode: {self.mode!r} (none | sync | async)")
        checks = {
            "workers.inversion.num_processes": (self.inversion.num_processes, 1),
            "workers.inversion.threads": (self.inversion.threads, 1),
            "workers.stats.num_processes": (self.stats.num_processes, 0),
            "workers.stats.refresh_every": (self.stats.refresh_every, 1),
            "workers.stats.batch_size": (self.stats.batch_size, 1),
            "workers.stats.threads": (self.stats.threads, 1),
            "workers.max_staleness": (self.max_staleness, 0),
            "workers.max_restarts": (self.max_restarts, 0),
        }
        for key, (value, low) in checks.items():
            if value < low:
                raise ValueError(f"Invalid {key}: {value} (must be at least {low})")
        for key, value in (
            ("heartbeat_s", self.heartbeat_s),
            ("wait_timeout_s", self.wait_timeout_s),
        ):
            if not value > 0:
                raise ValueError(f"Invalid workers.{key}: {value} (must be positive)")
        if self.cpus is not None:
            self.cpus = [int(c) for c in self.cpus]
            available = available_cpus()
            if not self.cpus or (available is not None and not set(self.cpus) <= available):
                raise ValueError(
                    f"Invalid workers.cpus: {self.cpus} (a non-empty list of this machine's "
                    f"CPUs: {sorted(available) if available is not None else 'any'}; or null)"
                )
