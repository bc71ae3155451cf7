"""SIGTERM/SIGINT as a request to stop cleanly: finish the step, checkpoint, then exit.

A scheduler's SIGTERM (or Ctrl-C) must not lose the run. The handler only records the first
signal; the loop asks :meth:`StopSignals.requested` after every step, every rank agreeing, so
all ranks stop after the same step. A second signal (a user who does not want to wait for the
checkpoint) raises :class:`StopForced` at once, which in a collective means once that
collective returns. A repeat that arrives within ``REPEAT_WINDOW_S`` of the first is the same
request delivered twice (Slurm signals every process of a step, and torchrun's agent forwards
the signal it got to its ranks as well) and is not counted as a second one.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import torch

__all__ = ["REPEAT_WINDOW_S", "STOP_SIGNALS", "StopForced", "StopSignals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 1.0


class StopForced(KeyboardInterrupt):
    """A second stop signal: leave now, without the stop's checkpoint.

    A ``KeyboardInterrupt`` so that no ``except Exception`` on the way swallows it.
    """

    def __init__(self, first: int, second: int):
        super().__init__(
            f"stopped by a second signal ({second}) before the stop's checkpoint was written; "
            "trainer.resume=auto continues from the newest checkpoint there is"
        )
        self.signum = first


class StopSignals:
    """Records the first SIGTERM/SIGINT while installed; :meth:`requested` asks every rank."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            now = time.monotonic()
            if self.received is None:
                self.received, self._first_at = signum, now
            elif now - self._first_at > REPEAT_WINDOW_S:
                raise StopForced(self.received, signum)

        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested(self, comm: Any, device: torch.device) -> int | None:
        """The signal all ranks stop on, or ``None``; every rank gets the same answer.

        One all-reduce of a single number per step on several ranks, none on one. Each rank
        adds 1 for SIGTERM and ``0.5 / world_size`` for SIGINT, so the sum says whether any rank
        got one and which (SIGTERM when both). A rank that got no signal itself records the one
        agreed on, so every rank's summary names it.
        """
        local = self.received
        if comm.world_size == 1:
            return local
        vote = {signal.SIGTERM: 1.0, signal.SIGINT: 0.5 / comm.world_size}.get(local, 0.0)
        total = torch.tensor([vote], device=device)
        comm.all_reduce(total, op="sum")
        seen = total.item()
        if seen == 0.0:
            return None
        if self.received is None:
            agreed = signal.SIGTERM if seen >= 1.0 else signal.SIGINT
            self.received, self._first_at = int(agreed), time.monotonic()
        return self.received
