"""Where a reproduction leaves cores idle: `make reproduce` with the machine's CPU use sampled beside it.

Runs the given command (default `make reproduce`) in a clone, reads the driver's stage lines as they
are printed ("[3/18] structure: running ...", "... done in ..."), and samples /proc/stat every 0.25 s.
Prints one row per stage: its wall time, the cores it kept busy on average (the whole machine's
non-idle time, so run it on a quiet machine), and the idle core-seconds it left. The training
stages run side by side and are also shown as one block. A stage's idle core-seconds are what
scheduling could still give back; busy cores are only made faster by doing less work.

    git clone . /tmp/x && .venv/bin/python benchmarks/reproduce_cpu.py /tmp/x        # ~10-12 min
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

LINE = re.compile(r"^\[(\d+)/(\d+)\] ([^:]+(?::[^:]+)?): (running|done in)")


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat's first line (iowait counted idle)."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("clone", type=Path, help="a fresh clone of the repository (its runs/ empty)")
    ap.add_argument("--command", default="make reproduce")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    samples: list[tuple[float, float, float]] = []  # (time, busy, total)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), *cpu_times()))
            stop.wait(0.25)

    threading.Thread(target=sample, daemon=True).start()
    spans: dict[str, list[float]] = {}
    start = time.monotonic()
    proc = subprocess.Popen(args.command, shell=True, cwd=args.clone, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        m = LINE.match(line.strip())
        if m:
            spans.setdefault(m.group(3), [math.nan, math.nan])[0 if m.group(4) == "running" else 1] = \
                time.monotonic()
    rc = proc.wait()
    end = time.monotonic()
    stop.set()

    def busy(t0: float, t1: float) -> float:
        """Mean busy cores between t0 and t1."""
        inside = [s for s in samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return math.nan
        (_, b0, a0), (_, b1, a1) = inside[0], inside[-1]
        return cores * (b1 - b0) / max(a1 - a0, 1e-9)

    rows = [(name, t0, t1) for name, (t0, t1) in spans.items() if not math.isnan(t1)]
    trains = [r for r in rows if r[0].startswith("train:")]
    if trains:
        rows = [r for r in rows if not r[0].startswith("train:")]
        rows.append(("training block", min(r[1] for r in trains), max(r[2] for r in trains)))
    rows.sort(key=lambda r: r[1])
    print(f"\nCPU: {cpu_model()}, {cores} cores; command `{args.command}` exited {rc}; "
          f"{(end - start) / 60:.1f} min in all (setup included)\n")
    print("| stage | wall s | cores busy | idle core-s |\n|---|---:|---:|---:|")
    for name, t0, t1 in rows + [("whole command", start, end)]:
        b = busy(t0, t1)
        print(f"| {name} | {t1 - t0:.0f} | {b:.2f} | {(cores - b) * (t1 - t0):.0f} |")
    return rc


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            amx = "AMX" if "amx_bf16" in flags else "no AMX"
            return f"{line.split(':', 1)[1].strip()} ({amx})"
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
