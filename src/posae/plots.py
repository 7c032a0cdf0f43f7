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
