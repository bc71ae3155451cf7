"""SIGTERM/SIGINT as a request to stop cleanly: checkpoint at the next log step, then exit.

A scheduler's SIGTERM (or Ctrl-C) must not lose the run; the handler only records the signal
and the loop decides when to stop, with every rank agreeing.
"""

from __future__ import annotations

import signal
from typing import Any

import torch

__all__ = ["StopSignals"]


class StopSignals:
    """Records SIGTERM/SIGINT while installed; :meth:`requested` asks every rank."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.received = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested(self, comm: Any, device: torch.device) -> bool:
        """Whether any rank got a signal; every rank agrees, so all stop together."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        comm.all_reduce(flag, op="sum")
        return bool(flag.item() > 0)
