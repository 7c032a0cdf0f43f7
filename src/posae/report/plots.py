"""Figures: one seaborn style for every notebook and for figures/."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from posae.paths import atomic_path

PAGE_WIDTH_IN = 7.0


def set_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight"})


def save(fig: plt.Figure, path_stem: Path) -> None:
    """Write `<stem>.png` and `<stem>.pdf`, each atomically (a killed figures stage leaves no half a PNG)."""
    for ext in ("png", "pdf"):
        with atomic_path(path_stem.with_suffix(f".{ext}")) as tmp:
            fig.savefig(tmp, format=ext)


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

ACCURACY_LABELS = {"acc_global": "global group", "acc_position": "position group",
                   "acc_position_x": "position group, input shuffled", "acc_all": "all features",
                   "acc_raw": "raw activations"}


def layer_palette(layers) -> dict:
    """One colour per layer, the same in every figure (a sequential palette in layer order)."""
    number = lambda x: int(str(x).rsplit(" ", 1)[-1])  # noqa: E731 (a layer or its label, "layer 13")
    layers = sorted(set(layers), key=number)
    return dict(zip(layers, sns.color_palette("viridis", len(layers) + 1)[:len(layers)]))


def _variant_labels(df: pd.DataFrame) -> pd.Series:
    """Variant names, with † where the groups are an arbitrary half split (no learned grouping)."""
    return df["variant"] + df["grouping"].map({"arbitrary": " †"}).fillna("")


def probe_accuracies(probes: pd.DataFrame) -> sns.FacetGrid:
    """Held-out probe accuracy per variant and feature set, mean and range over seeds, one panel per layer.

    `probes` is probes.csv (`posae.eval.probes.probe_all`); the dashed line is chance (1/buckets).
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
    """U with the SAE's position input kept beside U_x (input neutralised): one dot per run, coloured by layer,
    a black bar at the mean over runs; grey crosses are U_x's null (the same probes with the labels permuted
    within sequences, unclipped). † = arbitrary halves."""
    df = probes.assign(variant=_variant_labels(probes))
    order = list(dict.fromkeys(df["variant"]))
    palette = layer_palette(df["layer"])
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 0.32 * len(order) + 1.6), sharey=True)
    panels = (("U", "U, SAE position input kept", None), ("U_x", "U_x, position input neutralised", "D_x_null"))
    for ax, (column, title, null) in zip(axes, panels):
        sns.stripplot(data=df, y="variant", x=column, hue="layer", palette=palette, order=order, dodge=False,
                      jitter=0.15, size=4, ax=ax, legend=ax is axes[0])
        means = df.groupby("variant", sort=False)[column].mean().reindex(order)
        ax.scatter(means.to_numpy(), range(len(order)), marker="|", s=300, color="black", zorder=3,
                   label="mean over runs")
        if null is not None:
            ax.scatter(df[null], df["variant"].map({v: i for i, v in enumerate(order)}) + 0.3, marker="x", s=12,
                       color="grey", lw=0.8, label="null (unclipped)")
        ax.axvline(0, color="black", lw=0.8)
        ax.set(xlim=(-0.1, 1.0), xlabel=column, ylabel="", title=title)
    legend: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(f"layer {lab}" if lab.isdigit() else lab, h)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def ground_truth_scores(df: pd.DataFrame) -> plt.Figure:
    """U (the SAE's position input kept: open circles) and U_x (shuffled: filled) per SAE, one panel per data
    set, the two reference SAEs on top in bold; † = arbitrary halves. `df` is ground_truth.csv
    (`posae.eval.ground_truth.ground_truth`)."""
    df = df.assign(label=_variant_labels(df))
    refs = list(dict.fromkeys(df.loc[df["kind"] == "reference", "label"]))
    labels = refs + sorted(set(df["label"]) - set(refs))
    y = list(range(len(labels)))
    panels = list(dict.fromkeys(df["data"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH_IN, 3.6), sharey=True, squeeze=False)
    for ax, data in zip(axes[0], panels):
        g = df[df["data"] == data].set_index("label").loc[labels]
        ax.hlines(y, g["U_x"], g["U"], color="lightgrey", lw=2, zorder=1)
        ax.scatter(g["U"], y, facecolors="white", edgecolors="C0", zorder=2, label="U: position input kept")
        ax.scatter(g["U_x"], y, color="C1", s=18, zorder=3, label="U_x: position input shuffled")
        ax.axhline(len(refs) - 0.5, color="grey", lw=0.8)
        ax.set(xlim=(-0.04, 1.04), title=f"{data} data", xlabel="")
    axes[0][0].set_yticks(y, labels)
    axes[0][0].invert_yaxis()
    for tick in axes[0][0].get_yticklabels()[:len(refs)]:
        tick.set_fontweight("bold")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.supxlabel("score = clip((acc_P − acc_G)/(1 − 1/buckets), 0, 1)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.legend(handles, names, loc="upper center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 1.0))
    return fig


def mse_by_position(by_position: pd.DataFrame, variants: list[str] | None = None) -> sns.FacetGrid:
    """Validation MSE (normalised scale) at each position, one line per variant (band: range over seeds),
    one panel per layer. `by_position` is `posae.eval.metrics.evaluate_all(...).by_position`."""
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

    `features` is `posae.eval.metrics.evaluate_all(...).features` (every layer and seed pooled); each
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
    (mean, std, text), as `posae.paper.PAPER_ABLATIONS` entries do, or is None where the paper has no figure."""
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
    sns.stripplot(data=df, y="variant", x="value", hue="layer", palette=layer_palette(df["layer"]), size=4, ax=ax,
                  jitter=0.15)
    ax.set(xlabel=xlabel + (" (%)" if percent else ""), ylabel="")
    ax.legend(fontsize=7, loc="best")
    return fig


# --------------------------------------------------------------------------- figures of the paper (06)


def mse_ratio(table: pd.DataFrame) -> plt.Figure:
    """Validation MSE of each variant over the baseline's: ours (mean ± std over layer-and-seed pairs)
    beside the paper's (its std propagated from Table 1's). `table` is `posae.report.tables.table1`."""
    df = table.dropna(subset=["mse_ratio_mean"]).reset_index(drop=True)
    y = pd.Series(range(len(df)), dtype=float)
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 0.32 * max(len(df), 2) + 1.2))
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.errorbar(df["mse_ratio_mean"], y - 0.12, xerr=df["mse_ratio_std"].fillna(0), fmt="o", color="black",
                ms=4, capsize=2, label="ours (normalised scale)")
    ax.errorbar(df["paper_mse_ratio_mean"], y + 0.12, xerr=df["paper_mse_ratio_std"].fillna(0), fmt="D",
                color="tab:red", ms=4, capsize=2, label="paper (Table 1, §6.1)")
    ax.set(yticks=y, yticklabels=df["variant"], xlabel="validation MSE / baseline's MSE (ratio, dimensionless)",
           title="Reconstruction cost of position awareness (dashed: the baseline)")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="best")
    return fig


def position_structure(norms: pd.DataFrame, raw: pd.DataFrame) -> plt.Figure:
    """Position in the raw activations (notebook 02): left, the norm of the normalised activation
    (centred, scaled to mean squared norm d: the SAE's input) at each position, one line per layer;
    right, held-out accuracy of the position-bucket probe on them per layer, chance dashed.

    `norms`: layer, position, normalised_norm_mean (`posae.eval.structure.norm_by_position`);
    `raw`: layer, acc_raw, chance (one row per layer, from probes.csv)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 2.8), width_ratios=(2.2, 1))
    colours = layer_palette(norms["layer"])
    sns.lineplot(data=norms.assign(layer=norms["layer"].map("layer {}".format)), x="position",
                 y="normalised_norm_mean", hue="layer", palette={f"layer {k}": c for k, c in colours.items()}, ax=left)
    left.set(xlabel="position in sequence (tokens)", ylabel="mean ‖(x − μ)·s‖ (normalised)",
             title="Activation norm by position")
    left.legend(fontsize=8, title=None)
    sns.barplot(data=raw.assign(layer=raw["layer"].astype(str)), x="layer", y="acc_raw", hue="layer",
                palette={str(k): c for k, c in colours.items()}, legend=False, ax=right)
    right.axhline(float(raw["chance"].iloc[0]), color="grey", ls="--", lw=1)
    right.set(ylim=(0, 1), xlabel="layer", ylabel="held-out accuracy", title="Raw position probe")
    fig.tight_layout()
    return fig


def placeholder(text: str) -> plt.Figure:
    """A figure that says why there is nothing to draw (e.g. no trained variant has the quantity)."""
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 1.2))
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()
    return fig


def lines_with_band(df: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, hue: str = "variant",
                    col: str = "layer", col_title: str = "layer {}") -> plt.Figure:
    """One line per `hue` (the mean over the other rows, e.g. seeds) with its range as a band, one
    panel per `col`: what `sns.relplot(kind="line", errorbar=("pi", 100))` draws, aggregated in one
    groupby (seaborn's per-group aggregation took seconds for 10 variants × 3 layers × 127 positions)."""
    stats = df.groupby([col, hue, x], sort=False)[y].agg(["mean", "min", "max"]).reset_index().sort_values(x, kind="stable")
    hues = list(dict.fromkeys(df[hue]))
    colours = dict(zip(hues, sns.color_palette(n_colors=len(hues))))
    panels = sorted(df[col].unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH_IN, 2.8), squeeze=False)
    for ax, value in zip(axes[0], panels):
        for name in hues:
            g = stats[(stats[col] == value) & (stats[hue] == name)]
            ax.plot(g[x], g["mean"], color=colours[name], lw=1.2, label=name)
            ax.fill_between(g[x], g["min"], g["max"], color=colours[name], alpha=0.2, lw=0)
        ax.set(title=col_title.format(value), xlabel="", ylabel="")
    axes[0][0].set_ylabel(ylabel)
    axes[0][len(panels) // 2].set_xlabel(xlabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title=hue, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
