"""The run directory belongs to one run: a second run is refused, a dead run's lock taken over,
a refused resume leaves the record alone, an unusable folder is one ``error:`` line, and plain
``horovodrun`` without ``trainer.run_dir`` finishes.

The lock is held here the way a run holds it (an ``flock`` on ``<run_dir>/run.lock`` with the
holder written inside), so these tests see what a second run sees.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import compose_config, small_run_overrides, train
from omegaconf import OmegaConf

from secondorder.config import ConfigError
from secondorder.distributed.testing import horovodrun_path, kill_process_tree, run_on_ranks
from secondorder.trainer.checkpoint import CheckpointError


@contextlib.contextmanager
def held_lock(run_dir: Path, pid: int = 4242) -> Iterator[None]:
    """Hold ``run_dir``'s lock as a live run would, naming ``pid`` on this host as the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        holder = {"host": socket.gethostname(), "pid": pid, "since": "2024-01-01 00:00:00"}
        f.write(json.dumps(holder) + "\n")
        f.flush()
        yield


def _cli(overrides: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "secondorder.train", *overrides],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        **kwargs,
    )


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a refused run (exit 2, no traceback)."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# -- one run at a time -------------------------------------------------------------------------


def test_a_busy_run_dir_is_refused_before_anything_is_written(
    tmp_path: Path, data_root: Path
) -> None:
    run_dir = tmp_path / "run"
    with held_lock(run_dir, pid=4242):
        with pytest.raises(ConfigError, match=r"in use by another run \(pid 4242 on host"):
            train(small_run_overrides(run_dir, data_root))
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]
    # Released: the directory is free again.
    summary, _ = train(small_run_overrides(run_dir, data_root, "trainer.max_steps=3"))
    assert summary["status"] == "completed"


def test_the_lock_of_a_dead_run_is_taken_over_with_a_notice(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture
) -> None:
    """What a killed run leaves: its holder in the file, no flock (the kernel dropped it)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = {"host": socket.gethostname(), "pid": 4243, "since": "2024-01-01 00:00:00"}
    (run_dir / "run.lock").write_text(json.dumps(dead) + "\n")
    summary, _ = train(small_run_overrides(run_dir, data_root, "trainer.max_steps=3"))
    assert summary["status"] == "completed"
    notices = [line for line in capsys.readouterr().err.splitlines() if "taking over" in line]
    assert len(notices) == 1 and "pid 4243" in notices[0]
    assert (run_dir / "run.lock").read_text() == ""  # released cleanly this time


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_runs_at_once_then_a_killed_one(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue's scenario through the entry point: while one run trains, a second on the same
    ``trainer.run_dir`` exits 2 naming it and writes nothing; after the first is killed with
    SIGKILL, a new run takes the directory over."""
    run_dir = tmp_path / "run"
    long_run = small_run_overrides(
        run_dir, data_root, "trainer.max_steps=100000", "trainer.eval_every=0"
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "secondorder.train", *long_run, "trainer.log_every=1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.time() + 180
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        second = _cli(small_run_overrides(run_dir, data_root, "trainer.max_steps=3"), timeout=120)
        line = _one_error_line(second)
        assert "in use by another run" in line and f"pid {first.pid} " in line
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    steps = [json.loads(s)["step"] for s in metrics.read_text().splitlines() if s.strip()]
    assert steps == sorted(set(steps)), "two runs wrote into one metrics.jsonl"
    summary, _ = train(small_run_overrides(run_dir, data_root, "trainer.max_steps=3"))
    assert summary["status"] == "completed"
    notice = capsys.readouterr().err
    assert "taking over" in notice and f"pid {first.pid} " in notice


def _run_on_rank(overrides: list[str]) -> str:
    from secondorder.train import run

    try:
        run(compose_config(overrides))
    except ConfigError as err:
        return str(err)
    return "trained"


@pytest.mark.slow
def test_every_rank_learns_that_the_run_dir_is_busy(tmp_path: Path, data_root: Path) -> None:
    """Rank 0 decides and tells the others: all ranks stop with the same error, none waits."""
    run_dir = tmp_path / "run"
    with held_lock(run_dir, pid=4244):
        answers = run_on_ranks(
            _run_on_rank,
            world_size=2,
            args=(small_run_overrides(run_dir, data_root),),
            timeout_s=120,
        )
    assert answers[0] == answers[1] and "in use by another run (pid 4244" in answers[0]


# -- a run dir that cannot be used -------------------------------------------------------------


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write into: permissions for a user; a read-only mount for root,
    whom permissions do not stop."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)])
    if mount.returncode != 0:
        pytest.skip("root without permission to mount a read-only file system")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("where", ["read_only", "below_a_file"])
def test_an_unusable_run_dir_is_a_config_error(
    tmp_path: Path, data_root: Path, read_only_dir: Path, where: str
) -> None:
    if where == "read_only":
        run_dir = read_only_dir / "run"
    else:
        (tmp_path / "a_file").write_text("")
        run_dir = tmp_path / "a_file" / "run"
    with pytest.raises(ConfigError, match=rf"trainer.run_dir='{run_dir}' cannot be used: "):
        train(small_run_overrides(run_dir, data_root))


def test_a_read_only_run_dir_exits_2_with_one_line(data_root: Path, read_only_dir: Path) -> None:
    result = _cli(small_run_overrides(read_only_dir, data_root), timeout=120)
    line = _one_error_line(result)
    assert f"trainer.run_dir={str(read_only_dir)!r} cannot be used" in line


# -- the config record -------------------------------------------------------------------------


def test_a_refused_resume_keeps_the_config_and_an_accepted_one_writes_its_own(
    tmp_path: Path, data_root: Path
) -> None:
    run_dir = tmp_path / "run"
    overrides = small_run_overrides(run_dir, data_root, "trainer.checkpoint_every=6")
    train(overrides)
    written = (run_dir / "config.yaml").read_text()
    with pytest.raises(CheckpointError):
        train([*overrides, "trainer.resume=auto", "optimizer=adamw"])
    assert (run_dir / "config.yaml").read_text() == written
    assert not list(run_dir.glob("config.resume-*"))
    summary, _ = train([*overrides, "trainer.resume=auto", "trainer.max_steps=18"])
    assert summary["steps"] == 18
    assert (run_dir / "config.yaml").read_text() == written
    resumed = OmegaConf.load(run_dir / "config.resume-1.yaml")
    assert resumed.trainer.max_steps == 18 and resumed.trainer.resume == "auto"


# -- plain horovodrun --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_plain_horovodrun_without_a_run_dir_finishes(tmp_path: Path, data_root: Path) -> None:
    """The default run dir is chosen by rank 0 and broadcast as a str while the other ranks
    pass None: Horovod must not take that for two different collectives."""
    overrides = [
        o
        for o in small_run_overrides("unused", data_root, "trainer.max_steps=4")
        if not o.startswith("trainer.run_dir=")
    ]
    command = [horovodrun_path() or "horovodrun", "--gloo", "-np", "2", "-H", "localhost:2"]
    command += [sys.executable, "-m", "secondorder.train", "model=cnn1d", "distributed=horovod"]
    proc = subprocess.Popen(
        [*command, *overrides],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)
        proc.communicate()
        pytest.fail("plain horovodrun without trainer.run_dir hung")
    assert proc.returncode == 0, output[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
