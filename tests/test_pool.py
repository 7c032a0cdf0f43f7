"""posae.pool: a SIGKILLed parent takes its spawned workers with it (a killed driver leaves no trainer behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PARENT = textwrap.dedent("""
    import os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    from posae.pool import spawn_pool

    def report(path):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)

    if __name__ == "__main__":
        path, kind = sys.argv[1], sys.argv[2]
        pool = spawn_pool(1) if kind == "spawn_pool" else ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(report, path)
        time.sleep(120)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for this purpose
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def worker_after_parent_killed(tmp_path: Path, kind: str) -> bool:
    """Start a parent with one busy worker, SIGKILL the parent, say whether the worker is alive 5 s later."""
    script, pid_file = tmp_path / "parent.py", tmp_path / f"{kind}.pid"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file), kind], cwd=tmp_path,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        still = alive(worker)
        if still:
            os.kill(worker, signal.SIGKILL)
        return still
    finally:
        parent.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_parent(tmp_path):
    assert not worker_after_parent_killed(tmp_path, "spawn_pool")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_plain_pool_outlives_its_killed_parent(tmp_path):
    """The planted negative: without the initializer the worker keeps running, so the test above can fail."""
    assert worker_after_parent_killed(tmp_path, "plain")
