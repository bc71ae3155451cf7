"""One run at a time per run directory, and a config record a refused resume cannot overwrite.

Two runs writing into the same directory interleave their metrics and overwrite each other's
checkpoints and summary without a word, so a run owns its directory for its whole life through
``<run_dir>/run.lock``: an exclusive ``flock`` held by rank 0, with the holder (host, pid, start
time) written inside so the refusal can name it. The kernel drops an ``flock`` when its process
dies, however it dies (``kill -9``, an OOM kill), so a lock left by a dead run is simply taken
over, with a notice naming the run that left it. On a file system without ``flock`` (some
cluster mounts) the holder written in the file is the lock: one on this host counts as alive
while its pid exists; one on another host cannot be checked, so the refusal says to delete the
file once that run is gone.

``config.yaml`` is the config of the run that started from step 0; every resume writes its own
``config.resume-<n>.yaml`` beside it, and removes it again when the resume is refused, so a
resume that does not happen leaves the record as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "RunDirBusy", "RunDirError", "RunDirLock", "next_resume_config"]

LOCK_NAME = "run.lock"
# What ``flock`` raises where the file system does not implement it.
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunDirError(RuntimeError):
    """The run directory cannot be used: it cannot be created or written."""


class RunDirBusy(RunDirError):
    """Another live run owns the run directory."""


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run that did not say who it is"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"running since {holder.get('since', '?')}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class RunDirLock:
    """Exclusive ownership of ``run_dir`` by this process until :meth:`release`.

    Args:
        run_dir: the run directory; created (with parents) when missing.
        notify: called with a one-line notice when a dead run's lock is taken over.

    Raises:
        RunDirBusy: another live run holds the directory (the message names it).
        RunDirError: the directory cannot be created or the lock file cannot be written.
    """

    def __init__(self, run_dir: str | os.PathLike, *, notify: Any = print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._notify = notify
        self._fd: int | None = None
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.run_dir, os.W_OK):
                raise PermissionError(errno.EACCES, "not writable", str(self.run_dir))
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            where = f" ({err.filename})" if err.filename else ""
            raise RunDirError(
                f"trainer.run_dir={str(self.run_dir)!r} cannot be used: "
                f"{err.strerror or err}{where}"
            ) from err
        try:
            self._acquire(fd)
        except OSError as err:  # an unexpected flock error, or a full disk
            os.close(fd)
            raise RunDirError(
                f"trainer.run_dir={str(self.run_dir)!r}: cannot write {self.path}: "
                f"{err.strerror or err}"
            ) from err
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _acquire(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held_by_flock = True
        except BlockingIOError:
            self._refuse(self._read(fd))
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
            held_by_flock = False
        previous = self._read(fd)
        if previous and not held_by_flock and self._alive_without_flock(previous):
            self._refuse(previous)
        if previous:
            self._notify(
                f"note: trainer.run_dir={str(self.run_dir)!r}: taking over the lock of a run "
                f"that ended without releasing it ({_describe(previous)})"
            )
        self._write(fd, self.holder)

    def _alive_without_flock(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != self.holder["host"]:
            return True  # cannot be checked from here
        pid = holder.get("pid")
        # Our own pid is a dead run's: in a container a restarted job often gets the same pid.
        return isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)

    def _refuse(self, holder: dict[str, Any]) -> None:
        hint = "wait for it to finish, or choose another trainer.run_dir"
        if holder.get("host") not in (None, self.holder["host"]):
            hint += f" (if that run is gone, delete {self.path})"
        raise RunDirBusy(
            f"trainer.run_dir={str(self.run_dir)!r} is in use by another run "
            f"({_describe(holder)}); {hint}"
        )

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace").strip()
        if not text:
            return {}
        try:
            holder = json.loads(text)
        except ValueError:
            return {"host": "?", "pid": "?", "since": f"unreadable lock file {text[:40]!r}"}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _write(fd: int, holder: dict[str, Any]) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)

    def release(self) -> None:
        """Empty the lock file (an empty file is a cleanly released lock) and unlock it.

        The file is kept: deleting it would let a run that opened it just before hold a lock on
        a file nobody else sees.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):  # a full or vanished disk must not mask the run's end
            if self._read(fd) == self.holder:
                os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def next_resume_config(run_dir: str | os.PathLike) -> Path:
    """The first free ``config.resume-<n>.yaml`` in ``run_dir`` (n from 1)."""
    n = 1
    while (Path(run_dir) / f"config.resume-{n}.yaml").exists():
        n += 1
    return Path(run_dir) / f"config.resume-{n}.yaml"
