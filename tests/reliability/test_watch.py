"""Dead launchers, workers that give up, and what a run records about itself.

- A launcher killed outright (SIGKILL, as the OOM killer does) takes its ranks and their
  curvature workers with it within seconds (the parent-death watch).
- A curvature worker that gave up ends the run as ``failed`` with one ``error:`` line, exit 1.
- K-FAC's interval timings reach the records; wandb continues a resumed run; every rank writes
  a heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, small_run_overrides

from secondorder.distributed.parent_watch import GRACE_S

LONG_RUN = ("trainer.max_steps=100000", "trainer.eval_every=0", "trainer.log_every=1")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _gone(proc: psutil.Process) -> bool:
    """Exited (a zombie counts: whoever adopted it may never reap it)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if not _gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if not _gone(p)]
    return alive


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Wait for ``condition()`` while ``proc`` runs (``log``: what to show when it does not)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


# -- the launcher dies ---------------------------------------------------------------------------

_ORPHAN = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "parent":
    child = subprocess.Popen([sys.executable, __file__, "child", *sys.argv[2:]])
    print(child.pid, flush=True)
    time.sleep(600)
else:
    from secondorder.distributed.parent_watch import watch_parent
    if sys.argv[2] == "ignore-term":  # a stop that hangs: the grace's SIGKILL ends it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch_parent(grace_s=0.5, poll_s=0.1, use_kernel=sys.argv[3] == "kernel")
    open(sys.argv[4], "w").close()
    time.sleep(600)
"""


@pytest.mark.parametrize(
    ("on_term", "use_kernel"),
    [("default", "kernel"), ("default", "thread"), ("ignore-term", "kernel")],
)
def test_a_process_dies_with_its_parent(tmp_path: Path, on_term: str, use_kernel: str) -> None:
    """The kernel's parent-death signal, the polling thread where there is none, and the
    SIGKILL after the grace when the process does not stop on SIGTERM."""
    script, ready = tmp_path / "orphan.py", tmp_path / "watching"
    script.write_text(textwrap.dedent(_ORPHAN))
    parent = subprocess.Popen(
        [sys.executable, str(script), "parent", on_term, use_kernel, str(ready)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        _wait_for(ready.exists, parent, script, timeout_s=60)
        parent.kill()
        parent.wait()
        assert not _wait_gone([child], timeout_s=5.0), "the child outlived its parent"
    finally:
        _kill_group(parent.pid)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_killing_the_torchrun_agent_ends_its_ranks_and_workers(
    tmp_path: Path, data_root: Path
) -> None:
    """SIGKILL of torchrun's agent (an OOM kill): both ranks and their inversion workers are
    gone within seconds, not left training under PID 1. Before that, each rank has written its
    own heartbeat."""
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    overrides = small_run_overrides(run_dir, data_root, "optimizer=kfac", "workers=async")
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "secondorder.train",
        *overrides,
        *LONG_RUN,
        "distributed=torch",
    ]
    with log.open("w") as out:
        agent = subprocess.Popen(
            command,
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    family: list[psutil.Process] = []
    try:
        me = psutil.Process(agent.pid)

        def training_with_workers() -> bool:
            ranks = me.children()
            metrics = run_dir / "metrics.jsonl"
            return (
                len(ranks) == 2
                and all(rank.children() for rank in ranks)
                and metrics.exists()
                and len(metrics.read_text().splitlines()) >= 3
                and all((run_dir / f"heartbeat.rank{r}.json").exists() for r in (0, 1))
            )

        _wait_for(training_with_workers, agent, log, timeout_s=180)
        family = me.children(recursive=True)
        agent.kill()
        agent.wait()
        left = _wait_gone(family, timeout_s=GRACE_S + 10)
        assert not left, f"left running: {[(p.pid, p.cmdline()[-3:]) for p in left]}"
    finally:
        _kill_group(agent.pid)
        for proc in family:  # torchrun starts every rank in a session of its own
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
    # Not asserted: rank 0's summary.json. The SIGTERM stop writes it when it completes within
    # the grace, but with the agent (and the rendezvous store it hosts) gone that is not
    # guaranteed: one full-suite run ended by the grace SIGKILL before the summary.


# -- a worker gives up ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_worker_that_gave_up_fails_the_run_with_one_line(tmp_path: Path, data_root: Path) -> None:
    """Its restarts exhausted, a curvature worker ends the run: status ``failed`` with the reason
    in the summary, one ``error:`` line on stderr, exit 1 (a failed run, not a user's mistake),
    no traceback."""
    run_dir, log = tmp_path / "run", tmp_path / "stderr.log"
    overrides = small_run_overrides(
        run_dir, data_root, "optimizer=kfac", "workers=async", "workers.max_restarts=0"
    )
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "secondorder.train", *overrides, *LONG_RUN],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        trainer = psutil.Process(proc.pid)
        metrics = run_dir / "metrics.jsonl"

        def training_with_a_worker() -> bool:
            workers = [p for p in trainer.children() if "spawn_main" in " ".join(p.cmdline())]
            return bool(workers) and metrics.exists() and len(metrics.read_text().split()) >= 2

        _wait_for(training_with_a_worker, proc, log, timeout_s=120)
        for worker in trainer.children():
            if "spawn_main" in " ".join(worker.cmdline()):
                worker.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    stderr = log.read_text()
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "giving up" in errors[0], stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "WorkerFailure" in summary["error"]


# -- records -------------------------------------------------------------------------------------


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kfac_interval_timings_reach_the_records(tmp_path: Path, data_root: Path) -> None:
    """Default intervals (factors every 10 steps, inverses every 100) and a record every 3 steps:
    no record lands on a factor or inverse step, yet the records covering them show their time
    (per-step means since the previous record) and the others show none."""
    from conftest import train

    train(small_run_overrides(tmp_path, data_root, "optimizer=kfac"))
    train_records = {r["step"]: r for r in _records(tmp_path) if "train_loss" in r}
    assert sorted(train_records) == [3, 6, 9, 12]
    # Factor steps are training steps 1 and 11, the only inverse step is step 1.
    factors = {step: r["time_factors_s"] > 0 for step, r in train_records.items()}
    inverses = {step: r["time_inverse_s"] > 0 for step, r in train_records.items()}
    assert factors == {3: True, 6: False, 9: False, 12: True}
    assert inverses == {3: True, 6: False, 9: False, 12: False}
    assert all(r["time_precondition_s"] > 0 for r in train_records.values())


@pytest.mark.timeout(120)
def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path, data_root: Path) -> None:
    """Offline wandb: the resumed run reuses the id stored in the run directory (one wandb run
    across restarts), with ``logger.entity`` and ``logger.group`` honoured."""
    from conftest import compose_config, train

    from secondorder.build import build_run

    wandb = (
        "logger=wandb",
        "logger.entity=team",
        "logger.group=study",
        "trainer.checkpoint_every=3",
    )
    train(small_run_overrides(tmp_path, data_root, *wandb, "trainer.max_steps=6"))
    first = (tmp_path / "wandb_id.txt").read_text().strip()
    cfg = compose_config(small_run_overrides(tmp_path, data_root, *wandb, "trainer.resume=auto"))
    with build_run(cfg) as trainer:
        summary = trainer.fit()
        run = trainer.logger.run
    assert summary["steps"] == 12
    assert (run.id, run.entity, run.group) == (first, "team", "study")
    offline = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    # wandb names a folder offline-run-<time>-<id>, adding "-1" when the same id already has a
    # folder from the same second (two short runs can start within one second).
    same_run = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(first)}(-\d+)?")
    assert len(offline) == 2 and all(same_run.fullmatch(name) for name in offline), offline


def test_every_rank_writes_a_heartbeat(tmp_path: Path, data_root: Path) -> None:
    """``heartbeat.rank<r>.json``: rank, step, seconds per step and data wait, rewritten at
    every log step (the two-rank case is in the torchrun test above)."""
    from conftest import train

    train(small_run_overrides(tmp_path, data_root))
    beat = json.loads((tmp_path / "heartbeat.rank0.json").read_text())
    assert (beat["rank"], beat["world_size"], beat["step"]) == (0, 1, 12)
    assert beat["step_time_s"] > 0 and 0 <= beat["data_wait_s"] < beat["step_time_s"]
    assert beat["pid"] == os.getpid() and abs(beat["updated_at"] - time.time()) < 60
    assert not list(tmp_path.glob(".heartbeat*"))  # written atomically: no temp file left
