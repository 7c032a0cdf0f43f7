"""The four ablations of paper §6.3 (notebook 05), each as mean ± std over seeds and layers, the
paper's figure beside it.

=========================  ===========================================================  ===========
ablation                   ours                                                         paper
=========================  ===========================================================  ===========
global_magnitude_share     share of Σ‖f‖₁ carried by the global group, validation       73% ± 5%
                           tokens, every variant with learned groups
gate_activation            mean of the learned gate σ(G) over its [T, P] table at the   0.12 ± 0.03
                           end of training (start beside it), gated variants
position_weighting         relative change of validation MSE, position_weighted vs      ±2%
                           baseline, paired by layer and seed
resampled_fraction         share of features resampled at least once during training    8% ± 2%
=========================  ===========================================================  ===========

Beyond the paper, `mask_activation` reports soft masking's learned mask σ(M) the same way as the
gate. Readings (docs/decisions.md §9): the paper measured its ablations on the hierarchical model; we report
every variant the quantity exists for and mark the paper's row. The gate starts at σ(0) = 0.5; the
paper's 0.12 is σ(−2), so a gate that never moved from such an initialisation would show it. The
gate mean is `SAE.diagnostics()` (the whole table, including position 0, which never trains when
BOS is excluded: it shifts the mean by at most |0.5 − g|/T).

Outputs under runs/<config>/: ablations.csv (one row per ablation and variant) and
ablations_runs.csv (one row per ablation, variant, layer and seed).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from posae import checkpoint
from posae.checkpoint import find_runs
from posae.config import Config
from posae.eval.metrics import Evaluation, evaluate_all
from posae.paper import PAPER_ABLATIONS
from posae.paths import run_dir, write_csv_atomic
from posae.progress import progress_iter

ABLATIONS_CSV, ABLATIONS_RUNS_CSV = "ablations.csv", "ablations_runs.csv"


NOTES = {
    "global_magnitude_share": "Σ‖f_global‖₁ / Σ‖f‖₁ on validation tokens (unit-norm decoder rows: also the share of "
                              "the contributions' norms)",
    "gate_activation": "mean σ(G) over the gate table at the end of training; `start` at initialisation",
    "position_weighting": "val MSE of position_weighted / baseline − 1, paired by layer and seed",
    "resampled_fraction": "features resampled at least once (inactive longer than resample_after × steps)",
    "mask_activation": "beyond the paper: soft masking's learned mask σ(M), like the gate",
}

# Which diagnostics key (`SAE.diagnostics`, logged as metrics/<key>) each gate-like ablation reads.
DIAGNOSTICS = {"gate_activation": "gate_mean", "mask_activation": "mask_mean"}


class Ablations(NamedTuple):
    summary: pd.DataFrame  # ablations.csv
    runs: pd.DataFrame  # ablations_runs.csv
    evaluation: Evaluation  # the validation metrics they read (posae.eval.metrics)


# --------------------------------------------------------------------------- one table per ablation (pure)


def global_magnitude_share(metrics: pd.DataFrame) -> pd.DataFrame:
    """Rows of variants with learned groups: variant, layer, seed, value (the global group's share)."""
    m = metrics[metrics["grouping"] == "learned"]
    return pd.DataFrame({"variant": m["variant"], "layer": m["layer"], "seed": m["seed"],
                         "value": m["global/magnitude_share"]}).reset_index(drop=True)


def position_weighting(metrics: pd.DataFrame, base: str = "baseline", weighted: str = "position_weighted") -> pd.DataFrame:
    """Paired rows (layer, seed present for both): mse_baseline, mse_weighted, value = weighted / baseline − 1."""
    cols = ["layer", "seed", "val/mse"]
    pairs = metrics.loc[metrics["variant"] == base, cols].merge(
        metrics.loc[metrics["variant"] == weighted, cols], on=["layer", "seed"], suffixes=("_baseline", "_weighted"))
    out = pd.DataFrame({"variant": weighted, "layer": pairs["layer"], "seed": pairs["seed"],
                        "mse_baseline": pairs["val/mse_baseline"], "mse_weighted": pairs["val/mse_weighted"]})
    out["value"] = out["mse_weighted"] / out["mse_baseline"] - 1.0
    return out.reset_index(drop=True)


def diagnostic(infos: list[dict], ends: list[dict[str, float]], key: str) -> pd.DataFrame:
    """Runs whose SAE reports diagnostics `key`: variant, layer, seed, value (end of training), start."""
    rows = [{"variant": i["variant"], "layer": i["layer"], "seed": i["seed"], "value": end[key],
             "start": i.get("diagnostics_start", {}).get(key, np.nan)}
            for i, end in zip(infos, ends) if key in end]
    return pd.DataFrame(rows, columns=["variant", "layer", "seed", "value", "start"])


def resampled_fraction(infos: list[dict]) -> pd.DataFrame:
    """variant, layer, seed, value = the run's config.json `resampled_fraction` (NaN where absent)."""
    return pd.DataFrame([{"variant": i["variant"], "layer": i["layer"], "seed": i["seed"],
                          "value": i.get("resampled_fraction", np.nan)} for i in infos],
                        columns=["variant", "layer", "seed", "value"])


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (ablation, variant): mean and std over layers and seeds, the paper's figure, a note."""
    rows = []
    for (ablation, variant), g in runs.groupby(["ablation", "variant"], sort=False):
        paper = PAPER_ABLATIONS.get(ablation)
        rows.append({
            "ablation": ablation, "variant": variant, "mean": g["value"].mean(), "std": g["value"].std(),
            "runs": int(g["value"].notna().sum()), "layers": g["layer"].nunique(),
            "start": g["start"].mean() if "start" in g and g["start"].notna().any() else np.nan,
            "paper_mean": paper.mean if paper else np.nan, "paper_std": paper.std if paper else np.nan,
            "paper": paper.text if paper else "not reported",
            "paper_scope": paper.scope if paper else "", "note": NOTES[ablation],
        })
    return pd.DataFrame(rows)


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as strings for reading: 'ours' (mean ± std, in % where the paper uses %) beside 'paper'."""
    ours = []
    for ablation, mean, std in zip(summary["ablation"], summary["mean"], summary["std"]):
        paper = PAPER_ABLATIONS.get(ablation)
        spec = ("+.1%" if ablation == "position_weighting" else ".1%") if paper and paper.percent else ".3f"
        std_spec = spec.lstrip("+")
        ours.append("n/a" if not np.isfinite(mean) else
                    f"{mean:{spec}} ± {std:{std_spec}}" if np.isfinite(std) else f"{mean:{spec}}")
    show = summary.assign(ours=ours, start=[f"{v:.3f}" if np.isfinite(v) else "" for v in summary["start"]])
    return show[["ablation", "variant", "ours", "runs", "start", "paper", "paper_scope"]].set_index(["ablation", "variant"])


# --------------------------------------------------------------------------- the runs on disk


def run_ablations(cfg: Config, progress: bool = True, write: bool = True) -> Ablations:
    """Every ablation over every finished run of `cfg`; writes ablations.csv and ablations_runs.csv.

    The validation metrics come from `posae.eval.metrics.evaluate_all`, which reuses the rows notebook 04
    saved when the weights and settings still match, and computes them otherwise.
    """
    evaluation = evaluate_all(cfg, progress=progress, write=False)
    folders = find_runs(cfg)
    infos = [checkpoint.read_info(f) for f in folders]
    ends = [checkpoint.load_sae(f).diagnostics() for f in progress_iter(folders, progress, "diagnostics")]
    parts = {
        "global_magnitude_share": global_magnitude_share(evaluation.metrics),
        "gate_activation": diagnostic(infos, ends, DIAGNOSTICS["gate_activation"]),
        "position_weighting": position_weighting(evaluation.metrics),
        "resampled_fraction": resampled_fraction(infos),
        "mask_activation": diagnostic(infos, ends, DIAGNOSTICS["mask_activation"]),
    }
    runs = pd.concat([df.assign(ablation=name) for name, df in parts.items() if len(df)], ignore_index=True)
    first = ["ablation", "variant", "layer", "seed", "value"]
    runs = runs[first + [c for c in runs if c not in first]]
    summary = summarise(runs)
    if write:
        write_csv_atomic(summary, run_dir(cfg.name) / ABLATIONS_CSV)
        write_csv_atomic(runs, run_dir(cfg.name) / ABLATIONS_RUNS_CSV)
    return Ablations(summary, runs, evaluation)
