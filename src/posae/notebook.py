"""What every notebook does first: validate the config, record the environment, set the plot style."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys

from posae.config import Config, load_config
from posae.paths import REPO_ROOT, check_writable, run_dir, write_json_atomic, write_text_atomic


@functools.lru_cache(maxsize=1)  # once per process: runs checkpoint often
def git_commit() -> str:
    """The repository's commit, with '+dirty' when the work tree has changes; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        block = open("/proc/cpuinfo").read().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}


def cpu_model() -> str:
    """The CPU's model name: results are byte-identical only on one CPU type, so every record names it."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_bf16_features() -> list[str]:
    """Which bf16 matmul units the CPU has (AMX makes bf16 ~9x fp32 here, AVX512-BF16 ~2x)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def record_environment(cfg: Config) -> None:
    """Save the package versions (as `pip freeze` lists them) and the machine a run used."""
    out = run_dir(cfg.name) / "environment"
    dists = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                    if d.metadata["Name"]}, key=str.lower)
    write_text_atomic(out / "pip-freeze.txt", "\n".join(dists) + "\n")
    import torch  # late: keeps `posae.notebook` importable without paying for torch

    write_json_atomic(out / "machine.json", {
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "processor": platform.processor(), "cpu_model": cpu_model(), "cpu_bf16": cpu_bf16_features(),
        "cpu_count": torch.get_num_threads(), "git_commit": git_commit(),
        "config_source": cfg.source,
    })


def setup(config: str) -> Config:
    """Load and validate `config` (a name under params/ or a path), record the environment, style plots."""
    cfg = load_config(config)
    check_writable(run_dir(cfg.name))  # an unwritable output fails now, not after the work
    threads = os.environ.get("POSAE_THREADS")
    if threads:  # the driver runs kernels side by side, each with its share of the cores
        import torch

        torch.set_num_threads(int(threads))
    record_environment(cfg)
    from posae.plots import set_style

    set_style()
    return cfg
