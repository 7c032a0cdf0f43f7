"""Worker processes for the stages that run several runs side by side (ground truth, probes, the study).

`spawn_pool(n)` is a `ProcessPoolExecutor` of `n` spawned processes (spawned, not forked: a forked child
would inherit the parent's torch thread pool and locks) that die with their parent. Without that, killing
a driver with SIGKILL (a user's ^C on a hung terminal, a CI timeout) left its workers training on,
holding run locks a resumed driver then waited for, and writing runs nobody would read. On Linux each
worker asks the kernel for SIGTERM when its parent goes (prctl PR_SET_PDEATHSIG); whatever a worker
was writing is a temporary file that the next run's `posae.paths.clean_stale_temps` removes.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` spawned processes that exit when this process dies, however it dies."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


def die_with_parent(parent: int) -> None:
    """In a worker: SIGTERM when the parent process exits; exit now if it already has (the race before prctl)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
