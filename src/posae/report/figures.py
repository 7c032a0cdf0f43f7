"""The paper's figures and tables, rebuilt from runs/<config>/ alone (notebook 06): no training, no model.

Everything is written under `figures_dir(config)`, ``figures/<config>/`` at the repository root
(``$POSAE_FIGURES/<config>`` when that is set, as the tests do):

    fig1a_training_curves.{png,pdf}      training loss against step, per variant, mean and band over seeds, per layer
    fig1b_unlearning_score.{png,pdf}     unlearning score per variant and layer (paper: 0.0 everywhere)
    probe_accuracies.{png,pdf}           the probe accuracies behind U
    mse_ratio.{png,pdf}                  validation MSE relative to the baseline, ours beside the paper's
    mse_by_position.{png,pdf}            validation MSE at each position, per variant
    ablation_<name>.{png,pdf}            the ablations of §6.3 (`posae.eval.ablations.PAPER`), the paper's value marked
    position_structure.{png,pdf}         raw activations (notebook 02): norm by position, raw probe accuracy
    table1.{csv,md}                      Table 1: per variant, our statistics beside the paper's numbers
    claims.{csv,md}                      each claim of the paper, our value, the paper's, and a verdict
    run_info.json                        config, machine, stage timings and wall time of the run

Inputs: val_metrics.csv, mse_by_position.csv (`posae.eval.metrics`), probes.csv (`posae.eval.probes`),
ablations.csv and ablations_runs.csv (`posae.eval.ablations`), the runs' metrics.jsonl
(`posae.checkpoint.metrics_frame`), the validation activation stores (norms, `posae.eval.structure`), and
the records the driver leaves in stages/ and environment/.

Verdicts (claims.csv), computed by `claims` from the numbers, never written by hand:

- **holds**: our mean ± std interval (over seeds and layers; a single run counts as std 0) overlaps the
  paper's interval: its mean ± std; for a bound ("L1 < 0.1") the half-line, cut at 0 for a
  non-negative quantity; for a point value with no spread (U = 0.0) the point widened by our
  measurement's noise (`u_noise`). A claim over several variants holds when it holds for each
  variant that can be compared.
- **differs**: the intervals do not overlap (for a claim over several variants: for at least one).
- **cannot be compared**: the paper's quantity has no stated scale (its MSE values: SPEC §9 compares
  their ratios and ordering instead), or we have no measurement (the variant was not trained).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from posae.report import plots
from posae.eval.ablations import ABLATIONS_CSV, ABLATIONS_RUNS_CSV, PAPER
from posae.checkpoint import metrics_frame
from posae.config import Config
from posae.eval.metrics import BY_POSITION_CSV, METRICS_CSV, write_csv_atomic
from posae.paths import FIGURES_DIR, REPO_ROOT, run_dir, write_json_atomic, write_text_atomic
from posae.eval.probes import PROBES_CSV

FIGURES_ENV = "POSAE_FIGURES"
BASELINE = "baseline"
HOLDS, DIFFERS, CANNOT = "holds", "differs", "cannot be compared"
VERDICTS = (HOLDS, DIFFERS, CANNOT)

# SPEC §5's order, which is the paper's (6.1 then 6.2); a variant added later sorts after these.
VARIANT_ORDER = ("baseline", "position_masking", "soft_masking", "soft_masking_sparse", "position_weighted",
                 "attention_routing", "residual", "hierarchical", "contrastive", "multiscale")


def figures_dir(config_name: str) -> Path:
    """``$POSAE_FIGURES/<config>`` when that is set, else ``figures/<config>`` at the repository root."""
    root = os.environ.get(FIGURES_ENV)
    return (Path(root) if root else FIGURES_DIR) / config_name


def ordered_variants(names: Iterable[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return sorted(set(names), key=lambda v: (rank.get(v, len(rank)), v))


# --------------------------------------------------------------------------- what the run left


class RunTables(NamedTuple):
    metrics: pd.DataFrame  # val_metrics.csv: one row per run
    by_position: pd.DataFrame  # mse_by_position.csv
    probes: pd.DataFrame  # probes.csv
    ablations: pd.DataFrame  # ablations.csv: one row per (ablation, variant)
    ablation_runs: pd.DataFrame  # ablations_runs.csv
    training: pd.DataFrame  # metrics.jsonl of every finished run, tidy (`metrics_frame`)
    norms: pd.DataFrame  # layer, position, norm_mean, norm_std, normalised_norm_mean (validation store)


_WRITTEN_BY = {METRICS_CSV: "04_probe", BY_POSITION_CSV: "04_probe", PROBES_CSV: "04_probe",
               ABLATIONS_CSV: "05_ablations", ABLATIONS_RUNS_CSV: "05_ablations"}


def _read_csv(config_name: str, name: str) -> pd.DataFrame:
    path = run_dir(config_name) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: notebook 06 only reads what earlier notebooks wrote. "
                                f"Fix: run notebooks/{_WRITTEN_BY[name]}.ipynb (or `python -m posae reproduce "
                                f"--config {config_name}`)")
    return _in_variant_order(pd.read_csv(path))


def _in_variant_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by `VARIANT_ORDER` (stable), so every figure lists and colours the variants alike."""
    if "variant" not in df or df.empty:
        return df
    rank = {v: i for i, v in enumerate(ordered_variants(df["variant"]))}
    return df.sort_values("variant", key=lambda s: s.map(rank), kind="stable").reset_index(drop=True)


def read_tables(cfg: Config) -> RunTables:
    """Every table the figures need, from runs/<config>/; the norms are recomputed from the validation
    stores (a fraction of a second per layer), since notebook 02 only displays them."""
    from posae.data.store import open_layer_stores
    from posae.eval.structure import norm_by_position

    norms = pd.concat([norm_by_position(store).assign(layer=layer)
                       for layer, store in open_layer_stores(cfg, "val").items()], ignore_index=True)
    return RunTables(
        metrics=_read_csv(cfg.name, METRICS_CSV), by_position=_read_csv(cfg.name, BY_POSITION_CSV),
        probes=_read_csv(cfg.name, PROBES_CSV), ablations=_read_csv(cfg.name, ABLATIONS_CSV),
        ablation_runs=_read_csv(cfg.name, ABLATIONS_RUNS_CSV),
        training=_in_variant_order(metrics_frame(cfg.name, layers=list(cfg.capture.layers))), norms=norms)


# --------------------------------------------------------------------------- table 1


class PaperRow(NamedTuple):
    """What the paper reports for one variant (NaN where it reports nothing)."""

    mse: float
    mse_std: float
    l1: float  # its "sparsity"
    l1_std: float
    U: float
    source: str


_NA = math.nan
PAPER_TABLE1: dict[str, PaperRow] = {
    "baseline": PaperRow(1.44, 0.05, 0.08, 0.01, 0.0, "Table 1; sparsity §6.1"),
    "position_masking": PaperRow(1.63, 0.07, _NA, _NA, 0.0, "Table 1"),
    "soft_masking": PaperRow(1.52, 0.04, _NA, _NA, 0.0, "Table 1"),
    "soft_masking_sparse": PaperRow(1.58, 0.06, _NA, _NA, _NA, "§6.1 (not in Table 1)"),
    "hierarchical": PaperRow(1.52, 0.08, 0.09, 0.02, 0.0, "Table 1; sparsity §6.2"),
    "contrastive": PaperRow(1.55, 0.06, _NA, _NA, 0.0, "Table 1"),
    "multiscale": PaperRow(1.59, 0.07, _NA, _NA, 0.0, "Table 1"),
}

# statistic -> column of val_metrics.csv. L1 is the per-feature mean activation ‖f‖₁/k, the scale the
# paper's "L1 < 0.1" fits (SPEC §9); training's metrics/l1 is the same quantity.
METRIC_STATS = {"mse": "val/mse", "l1": "sparsity/mean_activation", "l0": "sparsity/l0",
                "explained_variance": "val/explained_variance", "dead_fraction": "sparsity/dead_fraction"}
PROBE_STATS = ("U", "acc_global", "acc_position", "acc_all", "acc_raw")


def paired_ratio(metrics: pd.DataFrame, column: str = "val/mse", base: str = BASELINE) -> pd.DataFrame:
    """variant, layer, seed, ratio = the run's `column` / the baseline's at the same layer and seed.

    Pairing by layer removes the differences between layers, which would otherwise dominate the spread.
    """
    keys = ["layer", "seed"]
    merged = metrics[["variant", *keys, column]].merge(
        metrics.loc[metrics["variant"] == base, [*keys, column]], on=keys, suffixes=("", "_base"))
    return merged.assign(ratio=merged[column] / merged[f"{column}_base"])[["variant", *keys, "ratio"]]


def paper_ratio(variant: str) -> tuple[float, float]:
    """The paper's MSE of `variant` over its baseline's, with the std propagated from both (independent)."""
    p, b = PAPER_TABLE1.get(variant), PAPER_TABLE1[BASELINE]
    if p is None:
        return _NA, _NA
    r = p.mse / b.mse
    return r, (0.0 if variant == BASELINE else r * math.hypot(p.mse_std / p.mse, b.mse_std / b.mse))


def _mean_std(values: pd.Series) -> tuple[float, float]:
    values = values.dropna()
    return (float(values.mean()) if len(values) else _NA), (float(values.std()) if len(values) > 1 else _NA)


def table1(tables: RunTables, variants: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per variant: mean and std over seeds and layers of each statistic, the MSE ratio to the
    baseline (paired by layer and seed), and the paper's numbers. `variants` defaults to every
    registered variant plus any other found in the runs; one without runs has runs = 0 and NaNs."""
    from posae.saes import REGISTRY

    m, p = tables.metrics, tables.probes
    names = ordered_variants(set(REGISTRY if variants is None else variants) | set(m["variant"]))
    ratios = paired_ratio(m)
    rows = []
    for v in names:
        mv, pv = m[m["variant"] == v], p[p["variant"] == v]
        row: dict[str, object] = {"variant": v, "grouping": mv["grouping"].iloc[0] if len(mv) else "",
                                  "runs": len(mv), "layers": mv["layer"].nunique(), "seeds": mv["seed"].nunique()}
        for stat, col in METRIC_STATS.items():
            row[f"{stat}_mean"], row[f"{stat}_std"] = _mean_std(mv[col])
        for stat in PROBE_STATS:
            row[f"{stat}_mean"], row[f"{stat}_std"] = _mean_std(pv[stat])
        row["mse_ratio_mean"], row["mse_ratio_std"] = _mean_std(ratios.loc[ratios["variant"] == v, "ratio"])
        paper = PAPER_TABLE1.get(v, PaperRow(_NA, _NA, _NA, _NA, _NA, ""))
        row.update({"paper_mse_mean": paper.mse, "paper_mse_std": paper.mse_std})
        row["paper_mse_ratio_mean"], row["paper_mse_ratio_std"] = paper_ratio(v)
        row.update({"paper_l1_mean": paper.l1, "paper_l1_std": paper.l1_std, "paper_U": paper.U,
                    "paper_source": paper.source})
        rows.append(row)
    return pd.DataFrame(rows)


def fmt(mean: float, std: float = _NA, digits: int = 3, percent: bool = False, signed: bool = False) -> str:
    """'mean ± std' for reading; '—' where there is no number, the mean alone where there is no std."""
    if not np.isfinite(mean):
        return "—"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    head = f"{mean * scale:{'+' if signed else ''}.{digits}f}{unit}"
    return f"{head} ± {std * scale:.{digits}f}{unit}" if np.isfinite(std) else head


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table of `df`'s cells as they are (strings), its columns as the header."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# column header -> (statistic, digits); the paper's columns sit right of ours
_TABLE1_COLUMNS = [("MSE", "mse", 3), ("MSE / baseline", "mse_ratio", 2), ("paper MSE", "paper_mse", 2),
                   ("paper MSE / baseline", "paper_mse_ratio", 2), ("L1", "l1", 3), ("paper L1", "paper_l1", 2),
                   ("L0", "l0", 1), ("EV", "explained_variance", 3), ("U", "U", 2), ("paper U", "paper_U", 1),
                   ("acc_G", "acc_global", 2), ("acc_P", "acc_position", 2), ("acc_all", "acc_all", 2),
                   ("acc_raw", "acc_raw", 2)]


def table1_markdown(table: pd.DataFrame) -> str:
    """Table 1 for reading: 'mean ± std' cells, the paper's numbers beside ours, notes under it."""
    show = pd.DataFrame({"variant": [v + (" †" if g == "arbitrary" else "") for v, g in
                                     zip(table["variant"], table["grouping"])], "runs": table["runs"]})
    for header, stat, digits in _TABLE1_COLUMNS:
        std = table[f"{stat}_std"] if f"{stat}_std" in table else pd.Series(_NA, index=table.index)
        mean = table[f"{stat}_mean"] if f"{stat}_mean" in table else table[stat]
        show[header] = [fmt(m, s, digits) for m, s in zip(mean, std)]
    return markdown_table(show) + (
        "\nMean ± std over seeds and layers (`runs` of them), on validation activations. MSE is per element on the "
        "normalised scale (centred and scaled so that predicting the mean scores 1.0); the paper's MSE scale is "
        "unstated, so compare the ratios to the baseline (ours paired by layer and seed; the paper's std propagated "
        "from its two stds) and the ordering, not the values. L1 = ‖f‖₁/k, the per-feature mean activation the "
        "paper's sparsity (target < 0.1) fits; L0 = active features per token; EV = explained variance. "
        "U = clip((acc_P − acc_G)/(1 − chance), 0, 1) from held-out position-bucket probes on the global (G) and "
        "position (P) feature groups, all features, and the raw activations. † no learned groups: U is computed on "
        "an arbitrary half split and measures no disentanglement. Paper: Table 1 (MSE, U), §6.1–6.2 (sparsity; "
        "soft_masking_sparse's MSE); — where it reports nothing.\n")


# --------------------------------------------------------------------------- verdicts (pure)


def interval_verdict(mean: float, std: float, low: float, high: float) -> str:
    """holds when [mean − std, mean + std] overlaps [low, high]; differs when not; cannot be compared
    without a measurement. A NaN std (a single run) counts as 0."""
    if not np.isfinite(mean):
        return CANNOT
    std = std if np.isfinite(std) else 0.0
    return HOLDS if mean - std <= high and mean + std >= low else DIFFERS


def combine(verdicts: Iterable[str]) -> str:
    """A claim over several variants: differs if any differs, else holds if any holds, else cannot be compared."""
    verdicts = list(verdicts)
    return DIFFERS if DIFFERS in verdicts else HOLDS if HOLDS in verdicts else CANNOT


def extremes_verdict(ours: dict[str, float], paper: dict[str, float]) -> str:
    """holds when the variants with the paper's lowest and highest value are also ours, among the
    variants both measured; cannot be compared with fewer than two of them."""
    common = [v for v in paper if np.isfinite(paper[v]) and np.isfinite(ours.get(v, _NA))]
    if len(common) < 2:
        return CANNOT
    same_min = min(common, key=paper.get) == min(common, key=ours.get)
    same_max = max(common, key=paper.get) == max(common, key=ours.get)
    return HOLDS if same_min and same_max else DIFFERS


def u_noise(test_tokens: int, chance: float) -> float:
    """Two standard errors of U for true accuracies equal, on `test_tokens` held-out tokens.

    Each accuracy's variance is at most 0.25/n; their difference (taken as independent, which
    overstates it for probes scored on the same tokens) at most 0.5/n; U divides it by 1 − chance.
    """
    return 2.0 * math.sqrt(0.5 / max(test_tokens, 1)) / (1.0 - chance)


# --------------------------------------------------------------------------- claims


class Claim(NamedTuple):
    claim: str
    source: str
    paper: str
    ours: str
    verdict: str
    reason: str
    ours_mean: float = _NA
    ours_std: float = _NA
    paper_low: float = _NA
    paper_high: float = _NA


def _per_variant(table: pd.DataFrame, stat: str, bounds: dict[str, tuple[float, float]], digits: int,
                 percent: bool = False) -> tuple[str, list[tuple[str, str, str]]]:
    """Verdict of `stat` of each variant in `bounds` against its interval: (combined, [(variant, ours, verdict)])."""
    rows = table.set_index("variant")
    out = []
    for v, (low, high) in bounds.items():
        mean = float(rows.at[v, f"{stat}_mean"]) if v in rows.index else _NA
        std = float(rows.at[v, f"{stat}_std"]) if v in rows.index else _NA
        out.append((v, fmt(mean, std, digits, percent), interval_verdict(mean, std, low, high)))
    return combine(w for _, _, w in out), out


def _explain(parts: list[tuple[str, str, str]], paper: dict[str, str] | None = None) -> str:
    """One line: the variants that differ (ours vs the paper's), those that hold, those not measured."""
    differ = [f"{v} {o}" + (f" vs {paper[v]}" if paper else "") for v, o, w in parts if w == DIFFERS]
    hold = [v for v, _, w in parts if w == HOLDS]
    missing = [v for v, _, w in parts if w == CANNOT]
    text = ["no overlap for " + "; ".join(differ)] if differ else []
    if hold:
        text.append(("overlaps for " if differ else "overlaps for every variant: ") + ", ".join(hold))
    if missing:
        text.append("not measured: " + ", ".join(missing))
    return "; ".join(text)


def _mse_claims(table: pd.DataFrame) -> list[Claim]:
    measured = table[table["runs"] > 0]
    lo, hi = measured["mse_mean"].min(), measured["mse_mean"].max()
    paper_mse = {v: p.mse for v, p in PAPER_TABLE1.items()}
    range_claim = Claim(
        "MSE between 1.44 and 1.63 for every variant", "§6.4, Table 1",
        "1.44–1.63", f"{lo:.3f}–{hi:.3f} (variant means, normalised scale)", CANNOT,
        "the paper does not state its MSE scale (ours: per element on centred, rescaled activations, where "
        "predicting the mean scores 1.0), so the values are not comparable: see the ratio and ordering rows",
        paper_low=1.44, paper_high=1.63)

    ratios = {v: paper_ratio(v) for v in PAPER_TABLE1 if v != BASELINE}
    bounds = {v: (r - s, r + s) for v, (r, s) in ratios.items()}
    verdict, parts = _per_variant(table, "mse_ratio", bounds, 2)
    paper_text = {v: fmt(r, s, 2) for v, (r, s) in ratios.items()}
    ratio_claim = Claim(
        "MSE relative to the baseline: position-aware variants reconstruct 6–13% worse", "Table 1 (ratios, SPEC §9)",
        ", ".join(f"{v} {r:.2f}" for v, (r, _) in ratios.items()),
        ", ".join(f"{v} {o}" for v, o, _ in parts), verdict,
        _explain(parts, paper_text) + " (ours: paired by layer and seed)")

    ours_mse = dict(zip(table["variant"], table["mse_mean"]))
    verdict = extremes_verdict(ours_mse, paper_mse)
    common = [v for v in paper_mse if np.isfinite(ours_mse.get(v, _NA))]
    order = " < ".join(sorted(common, key=ours_mse.get))
    lowest, highest = min(paper_mse, key=paper_mse.get), max(paper_mse, key=paper_mse.get)
    order_claim = Claim(
        f"MSE ordering: {lowest} lowest, {highest} highest", "Table 1, §6.1",
        " < ".join(sorted(paper_mse, key=paper_mse.get)), order or "—", verdict,
        f"ours, by mean MSE: {order}" if common else "no variant of the paper's tables was measured")
    return [range_claim, ratio_claim, order_claim]


def _sparsity_claims(table: pd.DataFrame) -> list[Claim]:
    measured = table[table["runs"] > 0]
    bounds = {v: (0.0, 0.1) for v in measured["variant"]}
    verdict, parts = _per_variant(table, "l1", bounds, 3)
    threshold = Claim(
        "sparsity L1 < 0.1 for every variant", "§5.2 (target)", "< 0.1",
        f"{measured['l1_mean'].min():.3f}–{measured['l1_mean'].max():.3f} (variant means)" if len(measured) else "—",
        verdict, _explain(parts) + " (L1 = ‖f‖₁/k, per-feature mean activation on the normalised scale)",
        paper_low=0.0, paper_high=0.1)
    stated = {v: p for v, p in PAPER_TABLE1.items() if np.isfinite(p.l1)}
    verdict, parts = _per_variant(table, "l1", {v: (p.l1 - p.l1_std, p.l1 + p.l1_std) for v, p in stated.items()}, 3)
    paper_text = {v: fmt(p.l1, p.l1_std, 2) for v, p in stated.items()}
    values = Claim("sparsity " + ", ".join(f"{paper_text[v]} ({v})" for v in stated), "§6.1, §6.2",
                   ", ".join(f"{v} {t}" for v, t in paper_text.items()), ", ".join(f"{v} {o}" for v, o, _ in parts),
                   verdict, _explain(parts, paper_text))
    return [threshold, values]


def _u_claim(table: pd.DataFrame, probes: pd.DataFrame) -> Claim:
    measured = table[table["runs"] > 0]
    n_test = int(probes["test_tokens"].min()) if len(probes) else 0
    noise = u_noise(n_test, float(probes["chance"].iloc[0])) if len(probes) else _NA
    verdict, parts = _per_variant(table, "U", {v: (0.0, noise) for v in measured["variant"]}, 2)
    return Claim(
        "unlearning score U = 0.0 for every variant", "Table 1, Fig. 1b, §6.4", "0.0",
        f"{measured['U_mean'].min():.2f}–{measured['U_mean'].max():.2f} (variant means)" if len(probes) else "—",
        verdict, _explain(parts) + f" (0 is widened to [0, {noise:.2f}], two standard errors of U on "
                                   f"{n_test} held-out tokens)",
        paper_low=0.0, paper_high=noise)


# Which variant's ablation each claim of §6.3 is read on: the paper measured its hierarchical model;
# position weighting exists as its own variant (baseline with w_t, vs baseline).
ABLATION_CLAIMS = {
    "global_magnitude_share": ("global features carry 73% ± 5% of the activation magnitude", "hierarchical"),
    "gate_activation": ("mean gate activation 0.12 ± 0.03 (attention favours global features)", "hierarchical"),
    "position_weighting": ("position-weighted loss scaling changes MSE by at most ±2%", "position_weighted"),
    "resampled_fraction": ("resampling affects 8% ± 2% of features", "hierarchical"),
}


def _ablation_claim(ablations: pd.DataFrame, name: str, text: str, variant: str) -> Claim:
    paper = PAPER[name]
    low, high = paper.mean - paper.std, paper.mean + paper.std
    rows = ablations[ablations["ablation"] == name].set_index("variant")
    found = variant in rows.index
    mean = float(rows.at[variant, "mean"]) if found else _NA
    std = float(rows.at[variant, "std"]) if found else _NA
    verdict = interval_verdict(mean, std, low, high)
    signed = low < 0  # a change either way, as "±2%": show its sign
    ours = fmt(mean, std, 1 if paper.percent else 3, paper.percent, signed)
    if not found:
        reason = f"{variant} was not trained or has no such quantity"
    else:
        paper_band = f"[{fmt(low, digits=1 if paper.percent else 2, percent=paper.percent)}, " \
                     f"{fmt(high, digits=1 if paper.percent else 2, percent=paper.percent)}]"
        reason = f"{variant} ({int(rows.at[variant, 'runs'])} runs) {ours} " \
                 f"{'overlaps' if verdict == HOLDS else 'lies outside'} the paper's {paper_band}"
        if np.isfinite(rows.at[variant, "start"]):
            reason += f"; it starts at {rows.at[variant, 'start']:.3f}"
        others = rows.drop(index=variant)["mean"].dropna()
        if len(others):
            spec = dict(digits=1 if paper.percent else 3, percent=paper.percent)
            reason += f"; other variants {fmt(others.min(), **spec)}–{fmt(others.max(), **spec)}"
    return Claim(text, f"§6.3, on {paper.scope}", paper.text, f"{variant} {ours}", verdict, reason,
                 mean, std, low, high)


def claims(tables: RunTables, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim of the paper: its value, ours, the verdict (module docstring) and a one-line reason."""
    table = table1(tables) if table is None else table
    rows = [*_mse_claims(table), *_sparsity_claims(table), _u_claim(table, tables.probes)]
    rows += [_ablation_claim(tables.ablations, name, text, variant) for name, (text, variant) in ABLATION_CLAIMS.items()]
    return pd.DataFrame(rows, columns=Claim._fields)


def claims_markdown(df: pd.DataFrame) -> str:
    show = df[["claim", "source", "paper", "ours", "verdict", "reason"]].assign(verdict=df["verdict"].map("**{}**".format))
    return markdown_table(show) + (
        "\nVerdicts are computed from the numbers (`posae.figures`): **holds** when our mean ± std (over seeds and "  # `posae.figures`: claims.md is a product; its bytes stay
        "layers) overlaps the paper's interval (its mean ± std, the bound, or 0 widened by the probe's noise), for "
        "every variant the claim covers; **differs** when it does not for at least one; **cannot be compared** "
        "where the paper's scale is unstated or we have no measurement.\n")


# --------------------------------------------------------------------------- run info


def run_info(cfg: Config, running: tuple[str, ...] = ("figures",)) -> dict:
    """Config, machine and timings of the run under runs/<config>/, from the driver's stage records.

    The stages in `running` are left out: this is called from inside the figures stage, whose record
    is written after it ends (an older one would describe a previous run). `wall_seconds` spans the
    first recorded stage's start to the last one's end, so it includes any pause between a killed
    run and its resumption; `stage_seconds` sums the stages' own times.
    """
    rd = run_dir(cfg.name)
    machine_path = rd / "environment" / "machine.json"
    machine = json.loads(machine_path.read_text()) if machine_path.exists() else {}
    source = Path(cfg.source)
    machine.pop("config_source", None)
    records = [json.loads(p.read_text()) for p in sorted((rd / "stages").glob("*.json"))]
    records = sorted((r for r in records if r["stage"] not in running), key=lambda r: r.get("finished", 0))
    starts = [r["finished"] - r["seconds"] for r in records if "finished" in r]
    ends = [r["finished"] for r in records if "finished" in r]
    return {
        "config": cfg.name,
        "config_source": str(source.relative_to(REPO_ROOT)) if source.is_relative_to(REPO_ROOT) else str(source),
        "machine": machine,
        "stages": [{"stage": r["stage"], "seconds": round(float(r["seconds"]), 1)} for r in records],
        "stage_seconds": round(sum(float(r["seconds"]) for r in records), 1),
        "wall_seconds": round(max(ends) - min(starts), 1) if ends else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(max(ends))) if ends else None,
        "not_included": list(running),
    }


# --------------------------------------------------------------------------- figures


def _training(t: RunTables, metric: str = "losses/total") -> plt.Figure:
    return plots.lines_with_band(t.training[t.training["metric"] == metric], "step", "value", "optimizer step",
                                 "training loss per token (eq. 7 + variant terms)")


def _unlearning(t: RunTables) -> plt.Figure:
    return plots.unlearning_scores(t.probes)


def _probe_accuracies(t: RunTables) -> plt.Figure:
    return plots.probe_accuracies(t.probes).figure


def _mse_ratio(t: RunTables) -> plt.Figure:
    return plots.mse_ratio(table1(t))


def _mse_by_position(t: RunTables) -> plt.Figure:
    return plots.lines_with_band(t.by_position, "position", "mse", "position in sequence (tokens)",
                                 "validation MSE per element (normalised)")


def _position_structure(t: RunTables) -> plt.Figure:
    raw = t.probes.groupby("layer", as_index=False).agg(acc_raw=("acc_raw", "first"), chance=("chance", "first"))
    return plots.position_structure(t.norms, raw)


# ablation -> (x-axis label, shown in percent)
ABLATION_AXES = {
    "global_magnitude_share": ("share of Σ‖f‖₁ carried by global features", True),
    "gate_activation": ("mean gate σ(G) after training", False),
    "position_weighting": ("change of validation MSE, position_weighted vs baseline", True),
    "resampled_fraction": ("features resampled at least once", True),
    "mask_activation": ("mean soft mask σ(M) after training (beyond the paper)", False),
}


def _ablation(t: RunTables, name: str) -> plt.Figure:
    xlabel, percent = ABLATION_AXES[name]
    runs = t.ablation_runs
    if runs.empty or not runs.loc[runs["ablation"] == name, "value"].notna().any():
        return plots.placeholder(f"{name}: no trained variant has this quantity")
    return plots.ablation(runs, name, PAPER[name], xlabel, percent)


FIGURES: dict[str, Callable[[RunTables], plt.Figure]] = {
    "fig1a_training_curves": _training,
    "fig1b_unlearning_score": _unlearning,
    "probe_accuracies": _probe_accuracies,
    "mse_ratio": _mse_ratio,
    "mse_by_position": _mse_by_position,
    **{f"ablation_{name}": functools.partial(_ablation, name=name) for name in ABLATION_AXES},
    "position_structure": _position_structure,
}
TABLES = ("table1.csv", "table1.md", "claims.csv", "claims.md", "run_info.json")


def draw(stem: str, tables: RunTables, out: Path) -> plt.Figure:
    """Draw the figure `stem` (a key of `FIGURES`), write `<out>/<stem>.png` and `.pdf`, return it."""
    fig = FIGURES[stem](tables)
    plots.save(fig, Path(out) / stem)
    return fig


def write_table1(tables: RunTables, out: Path) -> pd.DataFrame:
    table = table1(tables)
    write_csv_atomic(table, Path(out) / "table1.csv")
    write_text_atomic(Path(out) / "table1.md", table1_markdown(table))
    return table


def write_claims(tables: RunTables, table: pd.DataFrame, out: Path) -> pd.DataFrame:
    df = claims(tables, table)
    write_csv_atomic(df, Path(out) / "claims.csv")
    write_text_atomic(Path(out) / "claims.md", claims_markdown(df))
    return df


def write_run_info(cfg: Config, out: Path) -> dict:
    info = run_info(cfg)
    write_json_atomic(Path(out) / "run_info.json", info)
    return info


def expected_outputs(out: Path) -> list[Path]:
    out = Path(out)
    return [out / f"{stem}.{ext}" for stem in FIGURES for ext in ("png", "pdf")] + [out / name for name in TABLES]


def check_outputs(out: Path) -> list[Path]:
    """Every expected output under `out`, or an error naming the missing ones."""
    missing = [p.name for p in expected_outputs(out) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{out}: missing {', '.join(missing)}. Fix: run notebooks/06_figures.ipynb to the end")
    return expected_outputs(out)


def build_all(cfg: Config) -> list[Path]:
    """Everything notebook 06 writes, without the notebook (figures are closed as they are saved)."""
    plots.set_style()
    tables, out = read_tables(cfg), figures_dir(cfg.name)
    for stem in FIGURES:
        plt.close(draw(stem, tables, out))
    write_claims(tables, write_table1(tables, out), out)
    write_run_info(cfg, out)
    return check_outputs(out)
