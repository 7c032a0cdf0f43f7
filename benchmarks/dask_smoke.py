"""Dask executor benchmark: the whole reproduction with the local executor, then on Dask with 1 and 2 workers.

    .venv/bin/python benchmarks/dask_smoke.py [--config smoke] [--workers 1,2]

Each setting is one fresh `python -m posae reproduce` process writing into fresh temporary
POSAE_RUNS / POSAE_FIGURES folders, so nothing is skipped and the LocalCluster's start-up is
counted. Prints a Markdown table for benchmarks/README.md: wall time of the whole command, of the
training block (from the structure stage's end to the last training stage's end, read from the
stage records), the summed task time of the training stages, the load average around each run, and
whether the SAE weights and the figures' tables are byte-identical to the local executor's.
Needs the dask extra (`pip install -e '.[dask]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(config: str, executor_args: list[str]) -> dict:
    runs, figures = tempfile.mkdtemp(prefix="posae-bench-runs-"), tempfile.mkdtemp(prefix="posae-bench-figures-")
    env = {**os.environ, "POSAE_RUNS": runs, "POSAE_FIGURES": figures}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "posae", "reproduce", "--config", config, *executor_args],
                            env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"{' '.join(executor_args) or 'local'} failed:\n{result.stderr[-3000:]}")
    records = {p.stem: json.loads(p.read_text()) for p in (Path(runs) / config / "stages").glob("*.json")}
    trains = [r for name, r in records.items() if name.startswith("train-")]
    return {"wall": wall, "train_wall": max(r["finished"] for r in trains) - records["structure"]["finished"],
            "train_task_seconds": sum(r["seconds"] for r in trains), "load": (load_before, os.getloadavg()[0]),
            "runs": Path(runs) / config, "figures": Path(figures) / config}


def products(r: dict) -> dict[str, bytes]:
    """The SAE weights and the figures' tables: what must not depend on the executor."""
    files = {f"saes/{p.relative_to(r['runs'] / 'saes')}": p for p in (r["runs"] / "saes").rglob("weights.safetensors")}
    files.update({f"figures/{p.name}": p for p in r["figures"].glob("*.csv")})
    return {name: p.read_bytes() for name, p in sorted(files.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smoke")
    parser.add_argument("--workers", default="1,2", help="comma-separated Dask worker counts (default: 1,2)")
    args = parser.parse_args()
    settings = {"local": [], **{f"dask, {n} worker{'s' if int(n) > 1 else ''}": ["--executor", "dask", "--workers", n]
                                for n in args.workers.split(",")}}
    results = {}
    for name, extra in settings.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run(args.config, extra)
    reference = products(results["local"])
    print(f"\n{args.config} reproduction, {os.cpu_count()} cores, local executor --jobs default "
          f"({os.cpu_count()}, one thread each)\n")
    print("| executor | wall | training block | training task time | load avg before → after | same products as local |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        same = "—" if name == "local" else ("yes" if products(r) == reference else "**no**")
        print(f"| {name} | {r['wall']:.1f} s | {r['train_wall']:.1f} s | {r['train_task_seconds']:.1f} s | "
              f"{r['load'][0]:.2f} → {r['load'][1]:.2f} | {same} |")


if __name__ == "__main__":
    main()
