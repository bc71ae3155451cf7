"""The generic worker executor: versions, double buffering, restarts, shutdown, no leaks."""

from __future__ import annotations

import os
import time

import pytest
import torch

from secondorder.distributed.workers import Job, WorkerFailure, WorkerPool

SPEC = {"x": ((3, 3), torch.float64)}
OUT = {"y": ((3, 3), torch.float64), "n": ((), torch.float64)}


def square_plus(inputs: dict, options: dict) -> dict:
    """A pure function: ``y = x @ x + c``, ``n = trace(x)``; sleeps ``delay`` seconds first."""
    time.sleep(options.get("delay", 0.0))
    x = inputs["x"]
    return {"y": x @ x + options["c"], "n": x.diagonal().sum()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _expected(x: torch.Tensor, c: float) -> torch.Tensor:
    return sum(x[:, k : k + 1] * x[k : k + 1, :] for k in range(3)) + c  # x @ x by outer products


def test_sync_and_async_compute_the_published_version_and_stop_cleanly() -> None:
    jobs = [Job(square_plus, SPEC, OUT, {"c": 1.0}), Job(square_plus, SPEC, OUT, {"c": 2.0})]
    x = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    sync = WorkerPool(jobs, mode="sync")
    assert sync.newest(0) is None and sync.completed_version(0) == -1
    sync.publish({"x": x}, 7)
    assert sync.completed_version(1) == 7
    with WorkerPool(jobs, mode="async", heartbeat_s=60.0) as pool:
        pids = pool.pids
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        assert pool.newest(0) is None
        for version in (3, 5):  # the second version lands in the other slot
            pool.publish({"x": x + version}, version)
            for j, c in enumerate((1.0, 2.0)):
                assert pool.wait(j, version, timeout_s=60.0)
                got_version, out = pool.newest(j)
                assert got_version == version
                torch.testing.assert_close(out["y"], _expected(x + version, c), rtol=0, atol=1e-9)
                assert float(out["n"]) == float((x + version).diagonal().sum())
        assert pool.wait(0, 99, timeout_s=0.05) is False  # never published: a bounded wait
        assert pool.restarts == 0 and pool.errors() == 0
        assert 0.0 <= pool.utilisation() <= 1.0
    for pid in pids:  # reaped: no orphans, no zombies
        assert not _alive(pid)
    _, out = sync.newest(1)
    torch.testing.assert_close(out["y"], _expected(x, 2.0), rtol=0, atol=1e-9)


def test_dead_and_stuck_workers_are_restarted_then_the_pool_gives_up() -> None:
    jobs = [Job(square_plus, SPEC, OUT, {"c": 0.0, "delay": 3.0})]
    pool = WorkerPool(jobs, mode="async", heartbeat_s=1.5, max_restarts=1).start()
    try:
        first = pool.pids[0]
        os.kill(first, 9)  # SIGKILL
        deadline = time.time() + 30
        while pool.check() == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert pool.restarts == 1 and pool.pids[0] != first and not _alive(first)
        assert "exited" in pool.events[0]
        # A job longer than heartbeat_s makes the worker look stuck: beyond max_restarts, fail.
        pool.publish({"x": torch.eye(3, dtype=torch.float64)}, 1)
        with pytest.raises(WorkerFailure, match="max_restarts=1"):
            deadline = time.time() + 60
            while time.time() < deadline:
                pool.check()
                time.sleep(0.05)
    finally:
        pids = pool.pids
        pool.close()
    assert not any(_alive(pid) for pid in pids)


def test_pool_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="Invalid mode"):
        WorkerPool([], mode="none")  # type: ignore[arg-type]
