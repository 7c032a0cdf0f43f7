"""SAE run folders: how a trained (or half-trained) SAE is written, read back and listed.

``runs/<config>/saes/<variant>/layer_<L>/seed_<s>/`` holds::

    weights.safetensors      the SAE's parameters (fp32), plus normalisation.mean_D (the training mean μ)
    config.json              everything needed to rebuild it: variant, full config, seed, layer, d_model,
                             k, seq_len, normalisation scale, store hash, git commit, step, done, and the
                             size and digest of each other file (`files`)
    metrics.jsonl            one line per logged step (namespaced keys: losses/*, metrics/*, perf/*)
    train_state.safetensors  optimizer moments and dead-feature counters; only while unfinished

Every checkpoint rewrites the whole folder in one rename (`atomic_dir`), so a kill at any moment
leaves either the previous checkpoint or the new one, never a mix. `load_sae` needs nothing but
the folder. A run's identity (variant, layer, seed) is its path; `read_info` refuses a config.json
that says otherwise, and `check_run` a file that is not the one config.json records (truncated,
edited, copied in from another run).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from posae.config import Config, SAEConfig, build_dataclass
from posae.data.store import file_problem, file_record
from posae.paths import atomic_dir, clean_stale_temps, read_json_object, run_dir
from posae.saes import SAE, build, variant_config

FORMAT_VERSION = 1
WEIGHTS, INFO, METRICS, STATE = "weights.safetensors", "config.json", "metrics.jsonl", "train_state.safetensors"
_NORM_PREFIX = "normalisation."


class CheckpointMismatch(ValueError):
    """A run folder holds another variant or shape than expected; the message names both and the fix."""


class CorruptRun(CheckpointMismatch):
    """A run folder's file is unreadable, or not what its writer recorded (truncated, edited, from another
    run, or saying another identity than its path); the message names the file and the fix."""


RETRAIN = ("Fix: train the run again (rerun its training stage, e.g. `python -m posae reproduce`, or notebook "
           "03_train for its variant): a run whose files do not check out is trained again into its folder")


def save_run(out: Path, sae: SAE, info: dict[str, Any], metrics: list[dict[str, Any]], mean_D: torch.Tensor,
             train_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the run folder `out` atomically; `train_state` None marks a finished run (no resume state kept)."""
    out = Path(out)
    clean_stale_temps(out.parent, out.name)
    weights = {k: v.detach().float().cpu().contiguous().clone() for k, v in sae.state_dict().items()}
    weights[_NORM_PREFIX + "mean_D"] = mean_D.detach().float().contiguous()
    with atomic_dir(out) as tmp:
        # One metadata key: safetensors writes the map in a random order, so with two the file's bytes (and
        # the evaluation's eval_key, a hash of them) would differ between identical runs. The format is in INFO.
        save_file(weights, str(tmp / WEIGHTS), metadata={"variant": info["variant"]})
        if train_state is not None:
            save_file({k: v.contiguous() for k, v in train_state.items()}, str(tmp / STATE))
        (tmp / METRICS).write_text("".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))
        # The digests go in config.json, not in the weights' metadata: the weights' bytes stay those of the SAE alone.
        files = {name: file_record(tmp / name) for name in (WEIGHTS, METRICS, STATE) if (tmp / name).exists()}
        (tmp / INFO).write_text(json.dumps({**info, "files": files, "format_version": FORMAT_VERSION}, indent=2,
                                           sort_keys=True) + "\n")


def read_info(folder: Path | str) -> dict[str, Any] | None:
    """The run's config.json, or None where there is no run; refused (`CorruptRun`) when it is not valid
    JSON or names another variant, layer or seed than the folder's path."""
    folder = Path(folder)
    path = folder / INFO
    if not path.exists():
        return None
    info = read_json_object(path, CorruptRun, RETRAIN)
    check_identity(folder, info)
    return info


_LAYER, _SEED = re.compile(r"layer_(\d+)"), re.compile(r"seed_(\d+)")


def path_identity(folder: Path | str) -> dict[str, Any] | None:
    """(variant, layer, seed) of a folder at ``saes/<variant>/layer_<L>/seed_<s>``; None for a folder elsewhere."""
    folder = Path(folder)
    layer, seed = _LAYER.fullmatch(folder.parent.name), _SEED.fullmatch(folder.name)
    if layer is None or seed is None or len(folder.parents) < 3 or folder.parents[2].name != "saes":
        return None
    return {"variant": folder.parent.parent.name, "layer": int(layer[1]), "seed": int(seed[1])}


def check_identity(folder: Path, info: dict[str, Any]) -> None:
    """The path says which run this is; a config.json saying another (edited, or copied from another run) is refused."""
    want = path_identity(folder)
    for key in ("variant", "layer", "seed") if want else ():
        if info.get(key) != want[key]:
            raise CorruptRun(f"{folder / INFO}: says {key} {info.get(key)!r}, but the folder is the run of {key} "
                             f"{want[key]!r} (a run's identity is its path, saes/<variant>/layer_<L>/seed_<s>). "
                             f"{RETRAIN}; or, if this folder was moved here from another run's place, move it back")


def check_run(folder: Path | str) -> dict[str, Any] | None:
    """config.json (None where there is none) once every file it records has its recorded size and digest
    (a few ms for a 3 MB run); raises `CorruptRun` naming the first that does not. A run written before
    digests were recorded has none to check and passes."""
    folder = Path(folder)
    info = read_info(folder)
    for name, recorded in (info or {}).get("files", {}).items():
        problem = file_problem(folder / name, recorded, where=INFO)
        if problem:
            raise CorruptRun(f"{problem}. {RETRAIN}")
    return info


def read_metrics(folder: Path | str) -> list[dict[str, Any]]:
    path = Path(folder) / METRICS
    if not path.exists():
        return []
    lines = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line:
            continue
        try:
            lines.append(json.loads(line))
        except ValueError as e:
            raise CorruptRun(f"{path}: line {n} is not valid JSON ({e}). {RETRAIN}") from None
    return lines


def read_train_state(folder: Path | str) -> dict[str, torch.Tensor] | None:
    path = Path(folder) / STATE
    return load_file(str(path)) if path.exists() else None


def load_sae(folder: Path | str, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE saved in `folder` from that folder alone (in eval mode)."""
    folder = Path(folder)
    info = read_info(folder)
    if info is None:
        raise FileNotFoundError(f"{folder}: no {INFO}, so no trained SAE here. Fix: train it with "
                                "posae.train.train_variant (notebook 03_train)")
    sae_cfg = build_dataclass(SAEConfig, info["config"]["sae"], f"{folder / INFO}: config.sae")
    sae = build(info["variant"], info["d_model"], sae_cfg, info["seq_len"], seed=info["seed"])
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt", device=str(device)) as f:
            saved_variant = (f.metadata() or {}).get("variant")
            weights = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(_NORM_PREFIX)}
    except (SafetensorError, OSError) as e:  # safetensors' own errors name no file
        raise unreadable_weights(folder, info, e) from None
    check_weights(folder, info, saved_variant, sae, weights)  # first: another variant's file is said as such
    check_file(folder, info, WEIGHTS)
    sae.load_state_dict(weights)
    return sae.to(device).eval()


def check_file(folder: Path, info: dict[str, Any], name: str) -> None:
    """The file `name` of the run has the size and digest config.json records (when it records them)."""
    recorded = info.get("files", {}).get(name)
    problem = file_problem(folder / name, recorded, where=INFO) if recorded else None
    if problem:
        raise CorruptRun(f"{problem}. {RETRAIN}")


def unreadable_weights(folder: Path, info: dict[str, Any], error: Exception) -> CorruptRun:
    """The error for a weights file safetensors cannot read: its recorded size or digest's, when one differs."""
    check_file(folder, info, WEIGHTS)
    return CorruptRun(f"{folder / WEIGHTS}: unreadable ({type(error).__name__}: {error}). {RETRAIN}")


def check_weights(folder: Path, info: dict[str, Any], saved_variant: str | None, sae: SAE,
                  weights: dict[str, torch.Tensor]) -> None:
    """The weights file must hold the SAE that config.json describes: its variant, tensors and shapes."""
    fix = "Fix: the two files come from different runs; delete the folder and train it again"
    if saved_variant is not None and saved_variant != info["variant"]:
        raise CheckpointMismatch(f"{folder}: {WEIGHTS} holds a {saved_variant} SAE, but {INFO} describes a "
                                 f"{info['variant']} SAE. {fix}")
    want = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise CheckpointMismatch(
                f"{folder}: {WEIGHTS} does not fit the {info['variant']} SAE of {INFO} (d_model {info['d_model']}, "
                f"k {info['k']}): {key} has shape {list(got[key]) if key in got else 'none (missing)'} in the "
                f"weights, {list(want[key]) if key in want else 'none (not a parameter)'} expected. {fix}")


def load_normalisation(folder: Path | str) -> tuple[torch.Tensor, float]:
    """(μ [D], scale) that map raw activations to the SAE's input scale: (x − μ) · scale."""
    folder = Path(folder)
    info = read_info(folder)
    if info is None:
        raise FileNotFoundError(f"{folder}: no {INFO}")
    check_file(folder, info, WEIGHTS)
    try:
        mean_D = load_file(str(folder / WEIGHTS))[_NORM_PREFIX + "mean_D"]
    except (SafetensorError, OSError) as e:
        raise unreadable_weights(folder, info, e) from None
    return mean_D, float(info["normalisation"]["scale"])


# --------------------------------------------------------------------------- listing runs


def run_folders(config_name: str, variants: list[str] | None = None, layers: list[int] | None = None,
                seeds: list[int] | None = None, finished_only: bool = True) -> list[Path]:
    """Run folders under runs/<config>/saes/, sorted, filtered by variant, layer and seed (each config.json
    checked against its path: `read_info`)."""
    found = []
    for info_path in sorted((run_dir(config_name) / "saes").glob(f"*/layer_*/seed_*/{INFO}")):
        info = read_info(info_path.parent)
        if ((variants is None or info["variant"] in variants) and (layers is None or info["layer"] in layers)
                and (seeds is None or info["seed"] in seeds) and (info["done"] or not finished_only)):
            found.append(info_path.parent)
    return found


def metrics_frame(config_name: str, variants: list[str] | None = None, layers: list[int] | None = None,
                  seeds: list[int] | None = None, finished_only: bool = True):
    """Every logged training metric, tidy: one row per (variant, layer, seed, step, metric) with its value.

    Columns: variant, layer, seed, step, tokens, metric (e.g. "losses/total", "metrics/l0"), value.
    Ready for seaborn: ``sns.relplot(data=df[df.metric == "losses/total"], x="step", y="value",
    hue="variant", col="layer", kind="line")`` draws the mean and band over seeds.
    """
    import pandas as pd

    rows = []
    for folder in run_folders(config_name, variants, layers, seeds, finished_only):
        info = read_info(folder)
        for line in read_metrics(folder):
            for key, value in line.items():
                if key not in ("step", "tokens"):
                    rows.append({"variant": info["variant"], "layer": info["layer"], "seed": info["seed"],
                                 "step": line["step"], "tokens": line.get("tokens"), "metric": key, "value": value})
    return pd.DataFrame(rows, columns=["variant", "layer", "seed", "step", "tokens", "metric", "value"])


def runs_frame(config_name: str, variants: list[str] | None = None, layers: list[int] | None = None,
               seeds: list[int] | None = None):
    """One row per finished run: its last logged metrics, gate (mask) mean at start and end, and timing.

    Training-batch figures (the last logged step); validation metrics are the evaluation's (04_probe).
    """
    import pandas as pd

    rows = []
    for folder in run_folders(config_name, variants, layers, seeds):
        info, lines = read_info(folder), read_metrics(folder)
        if not lines:
            continue
        last = lines[-1]
        row = {"variant": info["variant"], "layer": info["layer"], "seed": info["seed"], "steps": info["step"]}
        row.update({k: last.get(f"metrics/{k}") for k in _TABLE_METRICS})
        # Gate and mask means at initialisation and at the end (docs/decisions.md §9: "report the gate's start and end").
        for key, start in info.get("diagnostics_start", {}).items():
            row[f"{key}_start"], row[f"{key}_end"] = start, last.get(f"metrics/{key}")
        row.update({f"loss_{k.split('/', 1)[1]}": v for k, v in last.items() if k.startswith("losses/")})
        row.update({"seconds": info.get("train_seconds"), "tokens_per_s": info.get("tokens_per_s")})
        rows.append(row)
    return pd.DataFrame(rows)


_TABLE_METRICS = ("mse", "explained_variance", "l0", "l1", "dead_fraction", "resampled_fraction")


def find_runs(cfg: Config, variants: list[str] | None = None) -> list[Path]:
    """Finished run folders of the configured layers; warns about expected runs that are missing.

    Each run's identity is its path, checked against its config.json, and each of its files against the
    size and digest config.json records (`checkpoint.check_run`): a corrupt run raises `CorruptRun`
    naming the file, rather than being evaluated or counted twice."""
    folders = run_folders(cfg.name, variants, list(cfg.capture.layers))
    if not folders:
        which = f"variants {', '.join(variants)}" if variants else "any variant"
        raise FileNotFoundError(f"no finished SAE runs of {which} under {run_dir(cfg.name) / 'saes'}. "
                                f"Fix: train them first (notebooks/03_train.ipynb -p variant <name>)")
    found = {(i["variant"], i["layer"], i["seed"]) for i in map(check_run, folders)}
    names = variants if variants is not None else sorted({v for v, _, _ in found})
    missing = [(v, layer, seed) for v in names for layer in cfg.capture.layers
               for seed in variant_config(cfg, v).train.seeds if (v, layer, seed) not in found]
    if missing:
        shown = ", ".join(f"{v}/layer {layer}/seed {seed}" for v, layer, seed in missing[:6])
        warnings.warn(f"{len(missing)} configured runs are not trained (e.g. {shown}); they are left out. "
                      f"Fix: run notebooks/03_train.ipynb for them", stacklevel=2)
    return folders
