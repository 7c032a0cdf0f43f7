"""What a run records about the code and the machine that made it: the commit, the CPU.

Base layer: training (its run_info.json) and the notebooks' environment record both read it.
"""

from __future__ import annotations

import functools
import platform
import subprocess

from posae.paths import REPO_ROOT


@functools.lru_cache(maxsize=1)  # once per process: runs checkpoint often
def git_commit() -> str:
    """The repository's commit, with '+dirty' when the code has uncommitted changes; 'unknown' outside git.

    figures/ is left out: it holds products, which a reproduction rewrites before its last stage records this.
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)figures"], cwd=REPO_ROOT,
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
