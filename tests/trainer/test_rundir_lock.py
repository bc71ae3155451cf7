"""The run directory lock on file systems without ``flock``: the holder in the file is the lock."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest

from secondorder.trainer import rundir
from secondorder.trainer.rundir import RunDirBusy, RunDirLock


@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", refuse)


def _leave_holder(run_dir: Path, **holder) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "run.lock").write_text(json.dumps(holder) + "\n")


def test_a_live_holder_on_this_host_is_refused(tmp_path: Path, no_flock: None) -> None:
    _leave_holder(tmp_path, host=socket.gethostname(), pid=os.getppid(), since="then")
    with pytest.raises(RunDirBusy, match=f"pid {os.getppid()} on host"):
        RunDirLock(tmp_path)


def test_a_holder_on_another_host_is_refused_with_how_to_override(
    tmp_path: Path, no_flock: None
) -> None:
    _leave_holder(tmp_path, host="elsewhere", pid=1, since="then")
    with pytest.raises(RunDirBusy, match="if that run is gone, delete"):
        RunDirLock(tmp_path)


def test_a_dead_holder_is_taken_over_and_the_lock_released(tmp_path: Path, no_flock: None) -> None:
    dead = 2**22 + 12345  # above the default pid_max
    _leave_holder(tmp_path, host=socket.gethostname(), pid=dead, since="then")
    notices: list[str] = []
    with RunDirLock(tmp_path, notify=notices.append) as lock:
        assert json.loads((tmp_path / "run.lock").read_text()) == lock.holder
    assert len(notices) == 1 and f"pid {dead}" in notices[0]
    assert (tmp_path / "run.lock").read_text() == ""
    RunDirLock(tmp_path).release()  # free again


def test_flock_refuses_a_second_holder_in_the_same_process(tmp_path: Path) -> None:
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()} on host"):
            RunDirLock(tmp_path)
    RunDirLock(tmp_path).release()
