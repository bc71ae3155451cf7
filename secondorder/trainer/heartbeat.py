"""Per-rank heartbeat: ``heartbeat.rank<r>.json`` in the run directory, rewritten at log steps.

Only rank 0 writes metrics and prints, so a straggler, a rank starved of data or a rank that
hangs would be invisible; every rank writes its own small file instead. Comparing them shows
which rank is behind (``step``), slow (``step_time_s``), waiting for data (``data_wait_s``) or
no longer running (``updated_at`` stops moving).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["Heartbeat"]


class Heartbeat:
    """Writes this rank's heartbeat file, atomically (a reader never sees half a record).

    A heartbeat is for people watching a run: failing to write it (a full disk, a run
    directory that is not shared with this node) is said once on stderr and never stops
    training.
    """

    def __init__(self, run_dir: str | os.PathLike, *, rank: int, world_size: int):
        self.path = Path(run_dir) / f"heartbeat.rank{rank}.json"
        self.rank, self.world_size = rank, world_size
        self._last: float | None = None
        self._warned = False

    def beat(self, *, step: int, steps: int, data_wait_s: float, started: float) -> None:
        """Record ``step``; ``steps`` training steps ran since the previous beat (or since
        ``started``, a ``time.perf_counter()`` value, for the first), ``data_wait_s`` seconds of
        them waiting for batches. Times are per step: wall time, evaluations and checkpoints
        included, so a slow rank stands out whatever slowed it."""
        now = time.perf_counter()
        interval = now - (started if self._last is None else self._last)
        self._last = now
        per_step = max(steps, 1)
        record = {
            "rank": self.rank,
            "world_size": self.world_size,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": step,
            "step_time_s": interval / per_step,
            "data_wait_s": data_wait_s / per_step,
            "updated_at": time.time(),
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(record) + "\n")
            os.replace(tmp, self.path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if not self._warned:
                self._warned = True
                print(f"rank {self.rank}: heartbeat not written: {err}", file=sys.stderr)
