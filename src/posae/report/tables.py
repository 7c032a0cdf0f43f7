"""The tables behind the figures: what the run left (`read_tables`) and Table 1, our statistics beside
the paper's (`table1`, `TABLE1`: a statistic is declared once there).

Inputs: val_metrics.csv, mse_by_position.csv (`posae.eval.metrics`), probes.csv (`posae.eval.probes`),
ablations.csv and ablations_runs.csv (`posae.eval.ablations`), the runs' metrics.jsonl
(`posae.checkpoint.metrics_frame`) and the validation activation stores (norms, `posae.eval.structure`).
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd

from posae.checkpoint import metrics_frame
from posae.config import Config
from posae.eval.ablations import ABLATIONS_CSV, ABLATIONS_RUNS_CSV
from posae.eval.metrics import BY_POSITION_CSV, METRICS_CSV
from posae.eval.probes import PROBES_CSV
from posae.paper import PAPER_TABLE1, PaperRow
from posae.paths import run_dir

BASELINE = "baseline"
_NA = math.nan

# docs/decisions.md §5's order, which is the paper's (6.1 then 6.2); a variant added later sorts after these.
VARIANT_ORDER = ("baseline", "position_masking", "soft_masking", "soft_masking_sparse", "position_weighted",
                 "attention_routing", "residual", "hierarchical", "contrastive", "multiscale")


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


class Stat(NamedTuple):
    """One statistic of Table 1. A new metric reaches the table by one line in `TABLE1`: its mean and std
    over seeds and layers go to table1.csv as ``<name>_mean``, ``<name>_std``, and, with a `header`, a
    column of table1.md."""

    name: str
    source: str  # "metrics": a column of val_metrics.csv; "probes": of probes.csv; "ratio": the paired MSE
    #              ratio to the baseline; "paper": one of the paper's columns (`posae.paper.PAPER_TABLE1`)
    column: str | None = None  # the column it averages (metrics, probes)
    header: str | None = None  # its column in table1.md; None: the CSV only
    digits: int = 3  # shown in table1.md


# In table1.md's order (the paper's columns right of ours); table1.csv groups them: the metrics, the
# probes, the ratio, then the paper's. L1 is the per-feature mean activation ‖f‖₁/k, the scale the
# paper's "L1 < 0.1" fits (docs/decisions.md §9); training's metrics/l1 is the same quantity.
TABLE1: tuple[Stat, ...] = (
    Stat("mse", "metrics", "val/mse", "MSE", 3),
    Stat("mse_ratio", "ratio", None, "MSE / baseline", 2),
    Stat("paper_mse", "paper", None, "paper MSE", 2),
    Stat("paper_mse_ratio", "paper", None, "paper MSE / baseline", 2),
    Stat("l1", "metrics", "sparsity/mean_activation", "L1", 3),
    Stat("paper_l1", "paper", None, "paper L1", 2),
    Stat("l0", "metrics", "sparsity/l0", "L0", 1),
    Stat("explained_variance", "metrics", "val/explained_variance", "EV", 3),
    Stat("dead_fraction", "metrics", "sparsity/dead_fraction"),
    Stat("U", "probes", "U", "U", 2),
    Stat("paper_U", "paper", None, "paper U", 1),
    Stat("acc_global", "probes", "acc_global", "acc_G", 2),
    Stat("acc_position", "probes", "acc_position", "acc_P", 2),
    Stat("acc_all", "probes", "acc_all", "acc_all", 2),
    Stat("acc_raw", "probes", "acc_raw", "acc_raw", 2),
)


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
        for stat in TABLE1:
            if stat.source == "metrics":
                row[f"{stat.name}_mean"], row[f"{stat.name}_std"] = _mean_std(mv[stat.column])
        for stat in TABLE1:
            if stat.source == "probes":
                row[f"{stat.name}_mean"], row[f"{stat.name}_std"] = _mean_std(pv[stat.column])
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


def table1_markdown(table: pd.DataFrame) -> str:
    """Table 1 for reading: 'mean ± std' cells, the paper's numbers beside ours, notes under it."""
    show = pd.DataFrame({"variant": [v + (" †" if g == "arbitrary" else "") for v, g in
                                     zip(table["variant"], table["grouping"])], "runs": table["runs"]})
    for stat in (s for s in TABLE1 if s.header is not None):
        name = stat.name
        std = table[f"{name}_std"] if f"{name}_std" in table else pd.Series(_NA, index=table.index)
        mean = table[f"{name}_mean"] if f"{name}_mean" in table else table[name]
        show[stat.header] = [fmt(m, s, stat.digits) for m, s in zip(mean, std)]
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
