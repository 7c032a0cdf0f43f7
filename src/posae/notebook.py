"""What every notebook does first: validate the config, record the environment, set the plot style."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from posae.checks import load_config
from posae.config import Config
from posae.paths import check_writable, run_dir, write_json_atomic, write_text_atomic
from posae.provenance import cpu_bf16_features, cpu_model, git_commit


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
    from posae.report.plots import set_style

    set_style()
    return cfg
