"""The tables behind the figures: what the run left (`read_tables`) and Table 1, our statistics beside
the paper's (`table1`, `TABLE1`: a statistic is declared once there).

Inputs: val_metrics.csv, mse_by_position.csv (`posae.eval.metrics`), probes.csv (`posae.eval.probes`),
fidelity.csv (`posae.eval.fidelity`), ablations.csv and ablations_runs.csv (`posae.eval.ablations`), the runs' metrics.jsonl
(`posae.checkpoint.metrics_frame`), the validation activation stores (norms, `posae.eval.structure`) and, when a
robustness study of this config has run, its matched-L0 MSE ratios (`study_matched`, `posae.study`).
"""

from __future__ import annotations

import json
import math
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd

from posae.checkpoint import metrics_frame
from posae.config import Config
from posae.eval.ablations import ABLATIONS_CSV, ABLATIONS_RUNS_CSV
from posae.eval.fidelity import FIDELITY_CSV
from posae.eval.metrics import BY_POSITION_CSV, METRICS_CSV
from posae.eval.probes import PROBES_CSV
from posae.paper import PAPER_TABLE1, PaperRow
from posae.paths import figures_dir, run_dir

BASELINE = "baseline"
_NA = math.nan

# docs/decisions.md §5's order, which is the paper's (6.1 then 6.2); a variant added later sorts after these.
VARIANT_ORDER = ("baseline", "position_masking", "soft_masking", "soft_masking_sparse", "position_weighted",
                 "attention_routing", "residual", "hierarchical", "contrastive", "multiscale")


def ordered_variants(names: Iterable[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return sorted(set(names), key=lambda v: (rank.get(v, len(rank)), v))


def layer_number(layer: object) -> int:
    """A layer's number, whether it is stored as 13, "13" or labelled "layer 13": what layers sort by."""
    try:
        return int(str(layer).rsplit(" ", 1)[-1])
    except ValueError:
        raise ValueError(f"layer {layer!r} is not a layer number (13, '13' or 'layer 13'). Fix: pass the layer "
                         f"column of a run's CSV") from None


def ordered_layers(layers: Iterable) -> list:
    """The distinct layers in numeric order (3, 8, 13: never "13" before "3"), as they were given."""
    return sorted(set(layers), key=layer_number)


# --------------------------------------------------------------------------- what the run left


class RunTables(NamedTuple):
    metrics: pd.DataFrame  # val_metrics.csv: one row per run
    by_position: pd.DataFrame  # mse_by_position.csv
    probes: pd.DataFrame  # probes.csv
    ablations: pd.DataFrame  # ablations.csv: one row per (ablation, variant)
    ablation_runs: pd.DataFrame  # ablations_runs.csv
    training: pd.DataFrame  # metrics.jsonl of every finished run, tidy (`metrics_frame`)
    norms: pd.DataFrame  # layer, position, norm_mean, norm_std, normalised_norm_mean (validation store)
    fidelity: pd.DataFrame  # fidelity.csv: one row per run (CE-loss score, KL)
    # The robustness study's MSE ratio to the baseline at matched L0 (`study_matched`): variant, layer,
    # mse_ratio; empty when no study of this config's stores has run.
    matched: pd.DataFrame = pd.DataFrame(columns=["variant", "layer", "mse_ratio"])


_WRITTEN_BY = {METRICS_CSV: "04_probe", BY_POSITION_CSV: "04_probe", PROBES_CSV: "04_probe", FIDELITY_CSV: "04_probe",
               ABLATIONS_CSV: "05_ablations", ABLATIONS_RUNS_CSV: "05_ablations"}


def _read_csv(config_name: str, name: str) -> pd.DataFrame:
    path = run_dir(config_name) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: notebook 06 only reads what earlier notebooks wrote. "
                                f"Fix: run notebooks/{_WRITTEN_BY[name]}.ipynb (or `python -m posae reproduce "
                                f"--config {config_name}`)")
    return _in_variant_order(pd.read_csv(path))


def _in_variant_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by `VARIANT_ORDER`, then by layer number (stable), so every figure and table lists and
    colours the variants alike and the layers as 3, 8, 13."""
    if "variant" not in df or df.empty:
        return df
    rank = {v: i for i, v in enumerate(ordered_variants(df["variant"]))}
    keys = ["variant", "layer"] if "layer" in df else ["variant"]
    return df.sort_values(keys, key=lambda s: s.map(rank) if s.name == "variant" else s.map(layer_number),
                          kind="stable").reset_index(drop=True)


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
        training=_in_variant_order(metrics_frame(cfg.name, layers=list(cfg.capture.layers))), norms=norms,
        fidelity=_read_csv(cfg.name, FIDELITY_CSV), matched=study_matched(cfg.name))


STUDY_JSON = "study.json"  # figures/<study>/study.json: which stores the study read, its layer and target L0


def study_matched(config_name: str) -> pd.DataFrame:
    """The target-L0 rows of `matched.csv` from a robustness study (`posae.study`) that read this config's
    stores, as Table 1's matched-L0 column reads them; empty without one. A study names its base in
    ``figures/<study>/study.json``; with several, the first by name."""
    for info_path in sorted(figures_dir("").glob(f"*/{STUDY_JSON}")):
        info = json.loads(info_path.read_text())
        matched = info_path.parent / "matched.csv"
        if info.get("stores") != config_name or not matched.exists():
            continue
        m = pd.read_csv(matched)
        m = m[m["target"].astype(bool)] if "target" in m else m.iloc[0:0]
        return m.assign(layer=info["layer"])[["variant", "layer", "mse_ratio"]].reset_index(drop=True)
    return pd.DataFrame(columns=["variant", "layer", "mse_ratio"])


# --------------------------------------------------------------------------- table 1


class Stat(NamedTuple):
    """One statistic of Table 1. A new metric reaches the table by one line in `TABLE1`: its mean and std
    over seeds and layers go to table1.csv as ``<name>_mean``, ``<name>_std``, and, with a `header`, a
    column of table1.md."""

    name: str
    source: str  # "metrics": a column of val_metrics.csv; "probes": of probes.csv; "fidelity": of fidelity.csv;
    #              "ratio": the paired MSE ratio to the baseline; "matched": the study's ratio at matched L0
    #              (`study_matched`); "paper": one of the paper's columns
    #              (`posae.paper.PAPER_TABLE1`)
    column: str | None = None  # the column it averages (metrics, probes)
    header: str | None = None  # its column in table1.md; None: the CSV only
    digits: int = 3  # shown in table1.md


# In table1.md's order (the paper's columns right of ours); table1.csv groups them: the metrics, the
# probes, the ratio, then the paper's. L1 is the per-feature mean activation ‖f‖₁/k, the scale the
# paper's "L1 < 0.1" fits (docs/decisions.md §9); training's metrics/l1 is the same quantity.
TABLE1: tuple[Stat, ...] = (
    Stat("mse", "metrics", "val/mse", "MSE", 3),
    Stat("mse_ratio", "ratio", None, "MSE / baseline", 2),
    Stat("mse_ratio_matched", "matched", "mse_ratio", "MSE / baseline, matched L0 (study)", 2),
    Stat("paper_mse", "paper", None, "paper MSE", 2),
    Stat("paper_mse_ratio", "paper", None, "paper MSE / baseline", 2),
    Stat("l1", "metrics", "sparsity/mean_activation", "L1", 3),
    Stat("paper_l1", "paper", None, "paper L1", 2),
    Stat("l0", "metrics", "sparsity/l0", "L0", 1),
    Stat("explained_variance", "metrics", "val/explained_variance", "EV", 3),
    Stat("dead_fraction", "metrics", "sparsity/dead_fraction"),
    Stat("position_coverage", "metrics", "position/coverage"),
    Stat("ce_score", "fidelity", "ce_score", "CE score", 3),
    Stat("kl", "fidelity", "kl_spliced", "KL", 3),
    Stat("U_x", "probes", "U_x", "U_x", 2),
    Stat("D_x", "probes", "D_x"),
    Stat("D_x_null", "probes", "D_x_null"),
    Stat("U", "probes", "U", "U, input kept", 2),
    Stat("paper_U", "paper", None, "paper U", 1),
    Stat("acc_global", "probes", "acc_global"),
    Stat("acc_position", "probes", "acc_position"),
    Stat("acc_global_x", "probes", "acc_global_x"),
    Stat("acc_position_x", "probes", "acc_position_x"),
    Stat("acc_all", "probes", "acc_all"),
    Stat("acc_raw", "probes", "acc_raw", "acc_raw", 2),
)

# The per-layer table (table1_by_layer.md): ours only, mean ± standard error over seeds at each layer.
BY_LAYER_HEADERS: dict[str, tuple[str, int]] = {
    "mse": ("MSE", 3), "mse_ratio": ("MSE / baseline", 2), "mse_ratio_matched": ("MSE / baseline, matched L0", 2),
    "l0": ("L0", 1), "explained_variance": ("EV", 3),
    "ce_score": ("CE score", 3), "kl": ("KL", 3), "U_x": ("U_x", 3), "D_x_null": ("D_x null", 3),
    "U": ("U, input kept", 2), "acc_position_x": ("acc_P_x", 2), "acc_position": ("acc_P", 2),
    "acc_global": ("acc_G", 2), "acc_raw": ("acc_raw", 2),
}


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


_SOURCES = {"metrics": "metrics", "probes": "probes", "fidelity": "fidelity", "matched": "matched"}


def table1(tables: RunTables, variants: Iterable[str] | None = None, by_layer: bool = False) -> pd.DataFrame:
    """One row per variant: mean and std over seeds and layers of each statistic, the MSE ratio to the
    baseline (paired by layer and seed), and the paper's numbers. `variants` defaults to every
    registered variant plus any other found in the runs; one without runs has runs = 0 and NaNs.

    `by_layer`: one row per variant and layer instead, over seeds, with ``<name>_se`` = std/√runs beside
    each std (the pooled std is mostly the spread between layers; this is the noise at one layer).
    """
    from posae.saes import REGISTRY

    m = tables.metrics
    names = ordered_variants(set(REGISTRY if variants is None else variants) | set(m["variant"]))
    frames = {"metrics": m, "probes": tables.probes, "fidelity": tables.fidelity, "matched": tables.matched,
              "ratio": paired_ratio(m).rename(columns={"ratio": "mse_ratio"})}
    layers = ordered_layers(m["layer"]) if by_layer else [None]
    rows = []
    for v in names:
        for layer in layers:
            pick = {k: df[(df["variant"] == v) & ((df["layer"] == layer) if layer is not None else True)]
                    if len(df) else df for k, df in frames.items()}
            mv = pick["metrics"]
            row: dict[str, object] = {"variant": v, **({"layer": layer} if by_layer else {}),
                                      "grouping": mv["grouping"].iloc[0] if len(mv) else "", "runs": len(mv),
                                      "layers": mv["layer"].nunique(), "seeds": mv["seed"].nunique()}
            for stat in TABLE1:
                if stat.source in _SOURCES or stat.source == "ratio":
                    df = pick["ratio" if stat.source == "ratio" else stat.source]
                    column = "mse_ratio" if stat.source == "ratio" else stat.column
                    values = df[column] if column in df else pd.Series(dtype=float)
                    row[f"{stat.name}_mean"], row[f"{stat.name}_std"] = _mean_std(values)
                    if by_layer:
                        n = int(values.notna().sum())
                        row[f"{stat.name}_se"] = row[f"{stat.name}_std"] / math.sqrt(n) if n > 1 else _NA
            if not by_layer:
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
        "\nMean ± std over seeds and layers (`runs` of them), on validation activations; table1_by_layer.md has each "
        "layer with standard errors over seeds. MSE is per element on the normalised scale (centred and scaled so that "
        "predicting the mean scores 1.0); the paper's MSE scale is unstated, so compare the ratios to the baseline (ours "
        "paired by layer and seed; the paper's std propagated from its two stds) and the ordering, not the values. "
        "L1 = ‖f‖₁/k, the per-feature mean activation the paper's sparsity (target < 0.1) fits; L0 = active features "
        "per token; EV = explained variance. CE score = (CE_zero − CE_spliced)/(CE_zero − CE_clean) with the "
        "reconstruction spliced into the model at its layer (1 = the model's own loss, 0 = the layer zeroed), KL = "
        "KL(clean ‖ spliced) per token in nats; the paper reports no downstream metric. U_x = clip((acc_P_x − acc_G_x)/"
        "(1 − chance), 0, 1) from held-out position-bucket probes on the global (G) and position (P) groups with the "
        "SAE's position input neutralised (positions shuffled across tokens), so it credits only position information "
        "the activation carries; U, input kept, is the same score with each token's own position fed to the SAE, "
        "which an SAE that echoes its position input also passes (the paper's measurement as we read it). acc_raw is "
        "the probe on the activations themselves. † no learned groups: U and U_x are computed on an arbitrary half "
        "split and measure no disentanglement. MSE / baseline, matched L0 (study): from the robustness study "
        "(`make study`, figures/study/), layer 8, one seed per λ1: each variant's MSE over the baseline's read off "
        "their MSE–L0 curves at the 1×-trained baseline's L0; — where no study has run or a curve does not reach "
        "that L0. Paper: Table 1 (MSE, U), §6.1–6.2 (sparsity; soft_masking_sparse's "
        "MSE); — where it reports nothing.\n")


def table1_by_layer_markdown(table: pd.DataFrame) -> str:
    """The per-layer table for reading: 'mean ± se' over seeds at each layer."""
    show = pd.DataFrame({"variant": [v + (" †" if g == "arbitrary" else "") for v, g in
                                     zip(table["variant"], table["grouping"])],
                         "layer": table["layer"].astype(int), "runs": table["runs"]})
    for name, (header, digits) in BY_LAYER_HEADERS.items():
        show[header] = [fmt(m, s, digits) for m, s in zip(table[f"{name}_mean"], table[f"{name}_se"])]
    return markdown_table(show[show["runs"] > 0]) + (
        "\nMean ± standard error over seeds (`runs` of them) at each layer; the columns as in table1.md. D_x null is "
        "the unclipped score of the same probes with the position labels permuted within each sequence: what the "
        "score reads when the features know nothing about position.\n")
