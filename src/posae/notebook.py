"""What every notebook does first: validate the config, record the environment, set the plot style."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import yaml

from posae.checks import load_config
from posae.config import Config, to_dict
from posae.paths import check_writable, run_dir, shown, write_json_atomic, write_text_atomic
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


def config_record(cfg: Config) -> str:
    """``environment/config.yaml``: the config as the run used it, every base merged and every override applied,
    headed by where it came from and the command that gives it again."""
    head = [f"# The config of runs/{cfg.name}/ as it ran: {shown(cfg.source)}"]
    if cfg.bases:
        head.append(f"# on its bases {' <- '.join(shown(b) for b in cfg.bases)} (base:)")
    if cfg.overrides:
        head.append(f"# with the overrides {', '.join(cfg.overrides)}")
    if cfg.stores_name != cfg.name:
        head.append(f"# Its activation stores are those of runs/{cfg.stores_name}/activations/ (the same model, "
                    "corpus and capture settings).")
    sets = "".join(f" --set '{o}'" for o in cfg.overrides)
    head.append(f"# Again: python -m posae reproduce --config {shown(cfg.source)}{sets}")
    return "\n".join(head) + "\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def setup(config: str, overrides: Any = "") -> Config:
    """Load and validate `config` (a name under params/ or a path) with `overrides` (the notebooks'
    parameter: "train.l1=0.05,train.steps=600" or a list of key=value; see docs/configs.md), record the
    environment and the config as merged, style plots."""
    cfg = load_config(config, overrides=overrides or None)
    check_writable(run_dir(cfg.name))  # an unwritable output fails now, not after the work
    threads = os.environ.get("POSAE_THREADS")
    if threads:  # the driver runs kernels side by side, each with its share of the cores
        import torch

        torch.set_num_threads(int(threads))
    record_environment(cfg)
    write_text_atomic(run_dir(cfg.name) / "environment" / "config.yaml", config_record(cfg))
    from posae.report.plots import set_style

    set_style()
    return cfg
