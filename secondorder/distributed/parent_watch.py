"""Parent-death watch: a rank or a worker exits when the process that started it dies.

A launcher killed outright (torchrun's agent or horovodrun hit by the OOM killer's SIGKILL) has
no chance to stop its children: they are adopted by PID 1 and go on training and writing into
the run directory. Two guards, both set by :func:`watch_parent`:

- Linux: ``prctl(PR_SET_PDEATHSIG, sig)``, the kernel sends ``sig`` the moment the parent dies
  (strictly: the parent's thread that started this process; launchers start ranks from their
  main thread);
- everywhere: a daemon thread compares ``os.getppid()`` with the parent seen at start every
  ``poll_s`` seconds and sends ``sig`` itself where the kernel could not be asked to.

A rank gets SIGTERM, its ordinary stop (checkpoint, summary, exit), and SIGKILL ``grace_s``
seconds after the death was seen if it has not exited by then (a collective waiting for a peer
that is gone, or a slow checkpoint). A curvature worker holds nothing worth saving: SIGKILL at
once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

__all__ = ["GRACE_S", "ParentWatch", "set_parent_death_signal", "watch_parent"]

GRACE_S = 10.0  # a rank's time to stop cleanly after its launcher died
_PR_SET_PDEATHSIG = 1
_active: ParentWatch | None = None
_lock = threading.Lock()


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``); ``False`` where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    return False


@dataclass
class ParentWatch:
    """The running watch of this process (see :func:`watch_parent`)."""

    parent: int
    signum: int
    grace_s: float | None
    poll_s: float
    kernel: bool  # the kernel sends the signal (prctl); the thread only enforces the grace
    thread: threading.Thread | None = None
    parent_died_at: float | None = None

    def run(self) -> None:
        while os.getppid() == self.parent:
            time.sleep(self.poll_s)
        self.parent_died_at = time.monotonic()
        print(
            f"parent process {self.parent} is gone (launcher killed?): stopping",
            file=sys.stderr,
            flush=True,
        )
        if not self.kernel:
            os.kill(os.getpid(), self.signum)
        if self.grace_s is not None and self.signum != signal.SIGKILL:
            time.sleep(self.grace_s)
            os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(
    *,
    parent: int | None = None,
    signum: int = signal.SIGTERM,
    grace_s: float | None = GRACE_S,
    poll_s: float = 1.0,
    use_kernel: bool = True,
) -> ParentWatch:
    """Send ``signum`` to this process when its parent dies, then SIGKILL ``grace_s`` later.

    Started once per process; later calls return the running watch.

    Args:
        parent: the pid whose death counts (default: this process's parent now). A process
            whose parent already differs from it is signalled at once.
        signum: SIGTERM for a rank (its clean stop), SIGKILL for a worker.
        grace_s: seconds between the death and the SIGKILL that ends a stop that hangs
            (``None``: no SIGKILL).
        poll_s: how often the thread compares ``os.getppid()`` with ``parent``.
        use_kernel: use ``prctl(PR_SET_PDEATHSIG)`` where available (``False``: the thread
            alone, as on platforms without it).
    """
    global _active
    with _lock:
        if _active is not None:
            return _active
        expected = os.getppid() if parent is None else parent
        kernel = use_kernel and set_parent_death_signal(signum)
        watch = ParentWatch(expected, signum, grace_s, poll_s, kernel)
        # The parent may have died before prctl took effect: then the kernel sends nothing.
        if kernel and os.getppid() != expected:
            watch.kernel = False
        watch.thread = threading.Thread(target=watch.run, name="parent-watch", daemon=True)
        watch.thread.start()
        _active = watch
        return watch
