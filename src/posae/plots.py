"""Figures: one seaborn style for every notebook and for figures/."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

PAGE_WIDTH_IN = 7.0


def set_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight"})


def save(fig: plt.Figure, path_stem: Path) -> None:
    """Write `<stem>.png` and `<stem>.pdf`."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(path_stem.with_suffix(f".{ext}"))


def norm_by_position(df: pd.DataFrame) -> plt.Figure:
    """`df`: columns layer, position, norm_mean, norm_std (raw activation norms)."""
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 3.2))
    for layer, g in df.groupby("layer"):
        ax.plot(g["position"], g["norm_mean"], label=f"layer {layer}")
        ax.fill_between(g["position"], g["norm_mean"] - g["norm_std"], g["norm_mean"] + g["norm_std"], alpha=0.2)
    ax.set(xlabel="position in sequence (tokens)", ylabel="‖x‖ (raw residual stream)",
           title="Activation norm by position")
    ax.legend()
    return fig


def pca_by_position(points: dict[int, tuple[pd.DataFrame, object]]) -> plt.Figure:
    """`points`: layer -> (DataFrame pc1, pc2, position; explained-variance ratio of the two PCs)."""
    fig, axes = plt.subplots(1, len(points), figsize=(PAGE_WIDTH_IN, 2.8), squeeze=False)
    for ax, (layer, (df, ratio)) in zip(axes[0], points.items()):
        sc = ax.scatter(df["pc1"], df["pc2"], c=df["position"], s=3, cmap="viridis", alpha=0.7, rasterized=True)
        ax.set(xlabel=f"PC1 ({ratio[0]:.0%} var.)", ylabel=f"PC2 ({ratio[1]:.0%} var.)", title=f"layer {layer}")
    fig.colorbar(sc, ax=axes[0].tolist(), label="position (tokens)")
    return fig


def training_curves(df: pd.DataFrame, metric: str = "losses/total") -> sns.FacetGrid:
    """Loss against step: one line per variant, mean and band over seeds, one panel per layer.

    `df` is tidy (variant, layer, seed, step, metric, value), as `posae.checkpoint.metrics_frame` gives.
    """
    data = df[df["metric"] == metric]
    grid = sns.relplot(data=data, x="step", y="value", hue="variant", col="layer", kind="line",
                       errorbar=("pi", 100), height=2.8, aspect=PAGE_WIDTH_IN / 3 / 2.8, facet_kws={"sharey": False})
    grid.set_axis_labels("optimizer step", f"{metric.split('/')[-1]} loss (normalised scale)")
    grid.set_titles("layer {col_name}")
    return grid


# --------------------------------------------------------------------------- evaluation (04) and ablations (05)

ACCURACY_LABELS = {"acc_global": "global group", "acc_position": "position group", "acc_all": "all features",
                   "acc_raw": "raw activations"}


def _variant_labels(df: pd.DataFrame) -> pd.Series:
    """Variant names, with † where the groups are an arbitrary half split (no learned grouping)."""
    return df["variant"] + df["grouping"].map({"arbitrary": " †"}).fillna("")


def probe_accuracies(probes: pd.DataFrame) -> sns.FacetGrid:
    """Held-out probe accuracy per variant and feature set, mean and range over seeds, one panel per layer.

    `probes` is probes.csv (`posae.probes.probe_all`); the dashed line is chance (1/buckets).
    """
    long = probes.assign(variant=_variant_labels(probes)).melt(
        id_vars=["variant", "layer", "seed"], value_vars=list(ACCURACY_LABELS), var_name="features",
        value_name="accuracy")
    long["features"] = long["features"].map(ACCURACY_LABELS)
    grid = sns.catplot(data=long, y="variant", x="accuracy", hue="features", col="layer", kind="point",
                       linestyle="none", dodge=0.5, errorbar=("pi", 100), markersize=4,
                       height=3.6, aspect=PAGE_WIDTH_IN / 3 / 3.6 * 1.1)
    for ax in grid.axes.flat:
        ax.axvline(float(probes["chance"].iloc[0]), color="grey", ls="--", lw=1)
        ax.set(xlim=(-0.02, 1.02), xticks=[0, 0.25, 0.5, 0.75, 1], xticklabels=["0", "", "0.5", "", "1"])
    grid.set_axis_labels("", "")
    grid.set_titles("layer {col_name}")
    grid.figure.supxlabel("held-out accuracy of the position-bucket probe (dashed: chance)", y=0.02)
    return grid


def unlearning_scores(probes: pd.DataFrame) -> plt.Figure:
    """U per variant (bars: mean over seeds, whiskers: their range), one colour per layer; † = arbitrary halves."""
    df = probes.assign(variant=_variant_labels(probes))
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 3.4))
    sns.barplot(data=df, y="variant", x="U", hue="layer", errorbar=("pi", 100), ax=ax, palette="crest")
    ax.set(xlim=(0, 1), xlabel="unlearning score U = clip((acc_P − acc_G)/(1 − 1/buckets), 0, 1)", ylabel="",
           title="Unlearning score (paper: 0.0 for every variant)")
    ax.legend(title="layer", loc="lower right")
    return fig


def mse_by_position(by_position: pd.DataFrame, variants: list[str] | None = None) -> sns.FacetGrid:
    """Validation MSE (normalised scale) at each position, one line per variant (band: range over seeds),
    one panel per layer. `by_position` is `posae.metrics.evaluate_all(...).by_position`."""
    df = by_position if variants is None else by_position[by_position["variant"].isin(variants)]
    grid = sns.relplot(data=df, x="position", y="mse", hue="variant", col="layer", kind="line",
                       errorbar=("pi", 100), height=2.8, aspect=PAGE_WIDTH_IN / 3 / 2.8,
                       facet_kws={"sharey": False})
    grid.set_axis_labels("", "MSE per element (normalised)")
    grid.set_titles("layer {col_name}")
    grid.figure.supxlabel("position in sequence (tokens)", y=0.02)
    return grid


def position_share_histograms(features: pd.DataFrame, threshold: float = 0.5) -> sns.FacetGrid:
    """Per variant, the distribution of each feature's position-variance share, one colour per group.

    `features` is `posae.metrics.evaluate_all(...).features` (every layer and seed pooled); each
    group's bars sum to 100%, dead features (share undefined) are left out; the dashed line is `threshold`.
    """
    df = features.dropna(subset=["position_share"]).assign(variant=_variant_labels(features))
    grid = sns.displot(data=df, x="position_share", hue="group", col="variant", col_wrap=5, bins=20,
                       binrange=(0, 1), stat="percent", common_norm=False, element="step",
                       height=1.8, aspect=PAGE_WIDTH_IN / 5 / 1.8 * 1.05)
    for ax in grid.axes.flat:
        ax.axvline(threshold, color="grey", ls="--", lw=1)
        ax.set(yscale="log", xticks=[0, 0.5, 1])
        ax.tick_params(labelbottom=ax.get_subplotspec().is_last_row())  # new ticks would show on every row
    grid.set_axis_labels("", "features (%)")
    grid.set_titles("{col_name}", size=8)
    grid.figure.supxlabel("share of a feature's activation variance explained by position "
                          "(between-position / total variance)", y=0.0)
    return grid


def ablation(runs: pd.DataFrame, name: str, paper: tuple | None, xlabel: str, percent: bool = False) -> plt.Figure:
    """One ablation: each run as a dot (colour = layer), the mean ± std over runs as a bar, per variant;
    the paper's mean ± std as a shaded band. `runs` is ablations_runs.csv; `paper` starts with
    (mean, std, text), as `posae.ablations.PAPER` entries do, or is None where the paper has no figure."""
    df = runs[runs["ablation"] == name].dropna(subset=["value"])
    scale = 100.0 if percent else 1.0
    df = df.assign(value=df["value"] * scale, layer=df["layer"].map("layer {}".format))
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 0.35 * max(df["variant"].nunique(), 2) + 1.2))
    if paper is not None:
        mean, std, text = paper[:3]
        ax.axvspan((mean - std) * scale, (mean + std) * scale, color="tab:red", alpha=0.15, label=f"paper: {text}")
        ax.axvline(mean * scale, color="tab:red", lw=1)
    sns.pointplot(data=df, y="variant", x="value", errorbar="sd", color="black", linestyle="none",
                  markers="|", markersize=12, ax=ax, label="mean ± std")
    sns.stripplot(data=df, y="variant", x="value", hue="layer", palette="crest", size=4, ax=ax, jitter=0.15)
    ax.set(xlabel=xlabel + (" (%)" if percent else ""), ylabel="")
    ax.legend(fontsize=7, loc="best")
    return fig
