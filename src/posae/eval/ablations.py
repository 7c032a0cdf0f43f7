"""The four ablations of paper §6.3 (notebook 05), each as mean ± std over seeds and layers, the
paper's figure beside it.

=========================  ===========================================================  ===========
ablation                   ours                                                         paper
=========================  ===========================================================  ===========
global_magnitude_share     share of Σ‖f‖₁ carried by the global group, validation       73% ± 5%
                           tokens, every variant with learned groups
gate_activation            mean of the learned gate σ(G) over its [T, P] table at the   0.12 ± 0.03
                           end of training (start beside it), gated variants
position_weighting         relative change of validation MSE with the loss weights w_t  ±2%
                           on vs off, paired by layer and seed: hierarchical vs
                           hierarchical_unweighted (the paper's pair), and
                           position_weighted vs baseline (a second pair)
resampled_fraction         share of features resampled at least once during training    8% ± 2%
=========================  ===========================================================  ===========

Beyond the paper, `mask_activation` reports soft masking's learned mask σ(M) the same way as the
gate. Readings (docs/decisions.md §9): the paper measured its ablations on the hierarchical model; we report
every variant the quantity exists for and mark the paper's row. The gate starts at σ(0) = 0.5; the
paper's 0.12 is σ(−2), so a gate that never moved from such an initialisation would show it. The
gate mean is `SAE.diagnostics()` (the whole table, including position 0, which never trains when
BOS is excluded: it shifts the mean by at most |0.5 − g|/T).

**The budget.** AdamW moves one parameter element by about lr per step at most, so a run's learned
tables can travel at most Σ_t lr_t from their start (`posae.train.lr_budget`, logged as
``budget/lr_sum``; ≈ 0.5 for the default 300 steps at 2e-3). The gate rows carry it (``budget``)
and how far the table actually moved (``moved``, the largest change of any logit,
``tables/gate_logits/max_abs_change``), so a claim can say when the paper's value lies beyond
what the run could reach (`posae.report.claims`).

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
    "position_weighting": "val MSE with w_t on / off − 1, paired by layer and seed: hierarchical vs "
                          "hierarchical_unweighted, and position_weighted vs baseline",
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


# The pairs of the position-weighting ablation, (w_t off, w_t on); rows are named by the weighted one.
WEIGHTING_PAIRS = (("hierarchical_unweighted", "hierarchical"), ("baseline", "position_weighted"))


def position_weighting(metrics: pd.DataFrame, base: str = "baseline", weighted: str = "position_weighted") -> pd.DataFrame:
    """Paired rows (layer, seed present for both): mse_baseline (w_t off), mse_weighted, value = weighted / off − 1."""
    cols = ["layer", "seed", "val/mse"]
    pairs = metrics.loc[metrics["variant"] == base, cols].merge(
        metrics.loc[metrics["variant"] == weighted, cols], on=["layer", "seed"], suffixes=("_baseline", "_weighted"))
    out = pd.DataFrame({"variant": weighted, "layer": pairs["layer"], "seed": pairs["seed"],
                        "mse_baseline": pairs["val/mse_baseline"], "mse_weighted": pairs["val/mse_weighted"]})
    out["value"] = out["mse_weighted"] / out["mse_baseline"] - 1.0
    return out.reset_index(drop=True)


def diagnostic(infos: list[dict], ends: list[dict[str, float]], key: str, finals: list[dict] | None = None,
               table: str | None = None) -> pd.DataFrame:
    """Runs whose SAE reports diagnostics `key`: variant, layer, seed, value (end of training), start; with
    `finals` (each run's last metrics record) and `table`, also the run's budget Σ lr_t and how far the
    table's logits moved at most (NaN where the record lacks them)."""
    finals = finals if finals is not None else [{} for _ in infos]
    rows = [{"variant": i["variant"], "layer": i["layer"], "seed": i["seed"], "value": end[key],
             "start": i.get("diagnostics_start", {}).get(key, np.nan),
             "budget": final.get("budget/lr_sum", np.nan),
             "moved": final.get(f"tables/{table}/max_abs_change", np.nan) if table else np.nan}
            for i, end, final in zip(infos, ends, finals) if key in end]
    return pd.DataFrame(rows, columns=["variant", "layer", "seed", "value", "start", "budget", "moved"])


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
            "budget": g["budget"].mean() if "budget" in g and g["budget"].notna().any() else np.nan,
            "moved": g["moved"].max() if "moved" in g and g["moved"].notna().any() else np.nan,
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


def ablation_runs(metrics: pd.DataFrame, infos: list[dict], ends: list[dict[str, float]],
                  finals: list[dict]) -> pd.DataFrame:
    """ablations_runs.csv from its inputs: `metrics` (val_metrics.csv rows), and per run its config.json
    (`infos`), its SAE's diagnostics at the end (`ends`) and its last metrics record (`finals`), in one order.
    One row per ablation, variant, layer and seed; empty (with the identity columns) when nothing applies."""
    weighting = pd.concat([position_weighting(metrics, off, on) for off, on in WEIGHTING_PAIRS], ignore_index=True)
    parts = {
        "global_magnitude_share": global_magnitude_share(metrics),
        "gate_activation": diagnostic(infos, ends, DIAGNOSTICS["gate_activation"], finals, "gate_logits"),
        "position_weighting": weighting,
        "resampled_fraction": resampled_fraction(infos),
        "mask_activation": diagnostic(infos, ends, DIAGNOSTICS["mask_activation"], finals, "mask_logits"),
    }
    first = ["ablation", "variant", "layer", "seed", "value"]
    found = [df.assign(ablation=name) for name, df in parts.items() if len(df)]
    if not found:
        return pd.DataFrame(columns=first)
    runs = pd.concat(found, ignore_index=True)
    return runs[first + [c for c in runs if c not in first]]


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
    finals = [(checkpoint.read_metrics(f) or [{}])[-1] for f in folders]
    runs = ablation_runs(evaluation.metrics, infos, ends, finals)
    summary = summarise(runs)
    if write:
        write_csv_atomic(summary, run_dir(cfg.name) / ABLATIONS_CSV)
        write_csv_atomic(runs, run_dir(cfg.name) / ABLATIONS_RUNS_CSV)
    return Ablations(summary, runs, evaluation)
