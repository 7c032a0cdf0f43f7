"""Figures: one style (seaborn's "paper" whitegrid) for every notebook and for figures/.

Every figure fits a page: at most `PAGE_WIDTH_IN` wide as saved (legends included, `figure_width`), its
legend under or beside the axes, never on the data. Layers are ordered by number and coloured by
`layer_palette` in every figure. A quantity that cannot be negative (a share, an accuracy, a count) is
drawn as its runs, their median and their range, never as a mean ± std that can reach below zero.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from posae.paths import atomic_path
from posae.report.tables import layer_number, ordered_layers

PAGE_WIDTH_IN = 7.0
BASELINE = "baseline"


# seaborn's colour-blind palette, and the matplotlib settings that
# ``seaborn.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)`` makes, written out:
# importing seaborn (and the scipy.stats it pulls in) costs every notebook's kernel about a second.
# tests/test_figures.py checks that these equal what seaborn sets.
COLORBLIND = ("#0173B2", "#DE8F05", "#029E73", "#D55E00", "#CC78BC", "#CA9161", "#FBAFE4", "#949494", "#ECE133",
              "#56B4E9")
# set_theme also points matplotlib's one-letter colours at the 6-colour version of the palette ("k" at .1 grey).
COLOR_CODES = dict(zip("bgrmyck", ("#0173B2", "#029E73", "#D55E00", "#CC78BC", "#ECE133", "#56B4E9", (.1, .1, .1))))
# The paper context is 0.8 x seaborn's base sizes, and its fonts are scaled by font_scale = 1.1 besides.
_PAPER, _FONTS = 0.8, 0.8 * 1.1
SEABORN_RC = {
    "axes.axisbelow": True, "axes.edgecolor": ".8", "axes.grid": True, "axes.labelcolor": ".15",
    "axes.labelsize": 12 * _FONTS, "axes.linewidth": 1.25 * _PAPER, "axes.titlesize": 12 * _FONTS,
    "font.size": 12 * _FONTS, "font.sans-serif": ["Arial", "DejaVu Sans", "Liberation Sans", "Bitstream Vera Sans",
                                                  "sans-serif"],
    "grid.color": ".8", "legend.fontsize": 11 * _FONTS, "legend.title_fontsize": 12 * _FONTS,
    "lines.linewidth": 1.5 * _PAPER, "lines.markersize": 6 * _PAPER, "lines.solid_capstyle": "round",
    "patch.edgecolor": "w", "patch.force_edgecolor": True, "patch.linewidth": 1 * _PAPER, "text.color": ".15",
    "xtick.bottom": False, "xtick.color": ".15", "xtick.labelsize": 11 * _FONTS, "xtick.major.size": 6 * _PAPER,
    "xtick.major.width": 1.25 * _PAPER, "xtick.minor.size": 4 * _PAPER, "xtick.minor.width": 1 * _PAPER,
    "ytick.color": ".15", "ytick.labelsize": 11 * _FONTS, "ytick.left": False, "ytick.major.size": 6 * _PAPER,
    "ytick.major.width": 1.25 * _PAPER, "ytick.minor.size": 4 * _PAPER, "ytick.minor.width": 1 * _PAPER,
}


def colorblind(n: int) -> list[tuple[float, float, float]]:
    """The first `n` colours of seaborn's colour-blind palette (cycling past ten), as RGB."""
    return [mpl.colors.to_rgb(COLORBLIND[i % len(COLORBLIND)]) for i in range(n)]


def set_style() -> None:
    plt.rcParams.update(SEABORN_RC)
    plt.rcParams["axes.prop_cycle"] = mpl.cycler(color=colorblind(len(COLORBLIND)))
    plt.rcParams["image.cmap"] = "viridis"  # seaborn's "rocket" needs seaborn; every figure names its colormap
    for code, colour in COLOR_CODES.items():
        mpl.colors.colorConverter.colors[code] = mpl.colors.to_rgb(colour)
    mpl.colors.colorConverter.cache.clear()
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight"})


def save(fig: plt.Figure, path_stem: Path) -> None:
    """Write `<stem>.png` and `<stem>.pdf`, each atomically (a killed figures stage leaves no half a PNG).

    The PDF carries no creation date, so the same figure drawn again is the same file (a stage that reruns
    and rewrites its products as they were leaves the stages that read them alone)."""
    for ext in ("png", "pdf"):
        with atomic_path(path_stem.with_suffix(f".{ext}")) as tmp:
            fig.savefig(tmp, format=ext, metadata={"CreationDate": None} if ext == "pdf" else None)


def figure_width(fig: plt.Figure) -> float:
    """The width in inches of `fig` as saved with bbox "tight" (legends and labels outside the axes included)."""
    fig.draw_without_rendering()  # lays the figure out (constrained layout, legends) as saving it does
    return fig.get_tightbbox().width


# --------------------------------------------------------------------------- shared pieces


def layer_label(layer) -> str:
    return f"layer {layer_number(layer)}"


def layer_palette(layers) -> dict:
    """One colour per layer, the same in every figure: a sequential palette in layer order (3, 8, 13).

    Keys are the layers as given (13, "13" or "layer 13"); a layer's colour depends on its rank only."""
    layers = ordered_layers(layers)
    cmap = plt.get_cmap("viridis")  # from dark purple to green: no pale yellow on the white background
    return {layer: cmap(x) for layer, x in zip(layers, np.linspace(0.05, 0.75, len(layers)) if len(layers) > 1
                                                else [0.05])}


def _legend_outside(fig: plt.Figure, handles: list, labels: list, ncol: int | None = None, above: bool = False,
                    **kw) -> None:
    """One legend for the figure, centred under its axes (above them where a shared x label is under them):
    off the data. The figure has constrained layout, which makes room for it."""
    fig.legend(handles, labels, loc=f"outside {'upper' if above else 'lower'} center", frameon=False,
               ncol=ncol or len(labels), **kw)


def _variant_labels(df: pd.DataFrame) -> pd.Series:
    """Variant names, with † where the groups are an arbitrary half split (no learned grouping)."""
    return df["variant"] + df["grouping"].map({"arbitrary": " †"}).fillna("")


def label_bars(ax: plt.Axes, fmt: str = "{:.2f}") -> None:
    """Write each bar's value on it, so a zero-height bar reads "0" instead of vanishing."""
    for patch in ax.patches:
        value = patch.get_height()
        if not np.isfinite(value):
            continue
        text = "0" if value == 0 else fmt.format(value)
        ax.annotate(text, (patch.get_x() + patch.get_width() / 2, value), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)


def runs_median_range(ax: plt.Axes, df: pd.DataFrame, order: list[str], x: str = "value",
                      labels: str | None = "{:.2f}") -> None:
    """Per variant (a row of `order`): every run as a dot coloured by layer, its range as a thin black line
    and its median as a black tick; `labels` formats the median, written right of the axes ("0" when 0)."""
    rows = {v: i for i, v in enumerate(order)}
    palette = layer_palette(df["layer"])
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(df))  # seeded: a figure drawn again is the same file
    stats = df.groupby("variant")[x].agg(["median", "min", "max"])
    for v, row in stats.iterrows():
        if v in rows:
            ax.hlines(rows[v], row["min"], row["max"], color="black", lw=1, zorder=2)
            ax.scatter([row["median"]], [rows[v]], marker="|", s=250, color="black", lw=2, zorder=4)
    for layer in ordered_layers(df["layer"]):
        pick = (df["layer"] == layer).to_numpy()
        ax.scatter(df.loc[pick, x], df.loc[pick, "variant"].map(rows) + jitter[pick], s=14, color=palette[layer],
                   zorder=3, label=layer_label(layer))
    ax.set_yticks(range(len(order)), order)
    ax.set_ylim(len(order) - 0.5, -0.5)
    if labels is not None:
        ax.annotate("median", (1.01, 1.0), xycoords="axes fraction", va="bottom", fontsize=8, style="italic")
        for v, row in stats.iterrows():
            if v in rows:
                text = "0" if row["median"] == 0 else labels.format(row["median"])
                ax.annotate(text, (1.01, rows[v]), xycoords=("axes fraction", "data"), va="center", fontsize=8)


def _runs_legend_handles(ax: plt.Axes) -> tuple[list, list]:
    """The layer dots of `runs_median_range` and the median/range key, for a legend."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="black", marker="|", markersize=10, mew=2, lw=1))
    labels.append("median, range over runs")
    return handles, labels


# --------------------------------------------------------------------------- raw activations (02)


def norm_by_position(df: pd.DataFrame) -> plt.Figure:
    """Left, the raw norm ‖x‖ at each position divided by its mean over positions (1 = the layer's mean),
    one line per layer; right, the norm of the normalised activation ‖(x − μ)·s‖, the SAE's input, whose
    mean square is d at every layer. `df`: layer, position, norm_mean, normalised_norm_mean
    (`posae.eval.structure.norm_by_position`)."""
    fig, (raw, normed) = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 2.6), sharex=True, layout="constrained")
    palette = layer_palette(df["layer"])
    for layer in palette:
        g = df[df["layer"] == layer].sort_values("position")
        raw.plot(g["position"], g["norm_mean"] / g["norm_mean"].mean(), color=palette[layer], label=layer_label(layer))
        normed.plot(g["position"], g["normalised_norm_mean"], color=palette[layer])
    raw.axhline(1.0, color="grey", ls="--", lw=0.8)
    raw.set(ylabel="mean ‖x‖ / its mean over positions", title="Raw residual stream")
    normed.set(ylabel="mean ‖(x − μ)·s‖", title="Centred and scaled (the SAE's input)")
    fig.supxlabel("position in sequence (tokens)", fontsize=10)
    _legend_outside(fig, *raw.get_legend_handles_labels(), above=True)
    return fig


def pca_by_position(points: dict[int, tuple[pd.DataFrame, object]]) -> plt.Figure:
    """`points`: layer -> (DataFrame pc1, pc2, position; explained-variance ratio of the two PCs), one panel per
    layer in layer order. Each panel's axes span the central 99% of its points (the few outliers beyond lie
    off the panel), so that one far token does not squeeze the rest into a line."""
    layers = ordered_layers(points)
    fig, axes = plt.subplots(1, len(layers), figsize=(PAGE_WIDTH_IN * 0.88, 2.6), squeeze=False,
                             layout="constrained")
    for ax, layer in zip(axes[0], layers):
        df, ratio = points[layer]
        sc = ax.scatter(df["pc1"], df["pc2"], c=df["position"], s=3, cmap="viridis", alpha=0.7, rasterized=True)
        for column, setter in (("pc1", ax.set_xlim), ("pc2", ax.set_ylim)):
            lo, hi = np.nanpercentile(df[column], [0.5, 99.5])
            setter(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.set(xlabel=f"PC1 ({ratio[0]:.0%} var.)", ylabel=f"PC2 ({ratio[1]:.0%} var.)", title=layer_label(layer))
    fig.colorbar(sc, ax=axes[0].tolist(), label="position (tokens)")
    return fig


def position_structure(norms: pd.DataFrame, raw: pd.DataFrame) -> plt.Figure:
    """Position in the raw activations (notebook 02): left, the norm of the normalised activation
    (centred, scaled to mean squared norm d: the SAE's input) at each position, one line per layer;
    right, held-out accuracy of the position-bucket probe on them per layer (its value on each bar),
    chance dashed.

    `norms`: layer, position, normalised_norm_mean (`posae.eval.structure.norm_by_position`);
    `raw`: layer, acc_raw, chance (one row per layer, from probes.csv)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 2.6), width_ratios=(2.2, 1), layout="constrained")
    colours = layer_palette(norms["layer"])
    for layer, colour in colours.items():
        g = norms[norms["layer"] == layer].sort_values("position")
        left.plot(g["position"], g["normalised_norm_mean"], color=colour, label=layer_label(layer))
    left.set(xlabel="position in sequence (tokens)", ylabel="mean ‖(x − μ)·s‖ (normalised)",
             title="Activation norm by position")
    order = ordered_layers(raw["layer"])
    bars = raw.set_index("layer").loc[order]
    right.bar(range(len(order)), bars["acc_raw"], color=[layer_palette(order)[k] for k in order])
    label_bars(right)
    right.axhline(float(raw["chance"].iloc[0]), color="grey", ls="--", lw=1)
    right.set(ylim=(0, 1), xticks=range(len(order)), xticklabels=[layer_number(k) for k in order], xlabel="layer",
              ylabel="held-out accuracy", title="Raw position probe")
    _legend_outside(fig, *left.get_legend_handles_labels())
    return fig


# --------------------------------------------------------------------------- curves per variant (03, 04, 05, 06)


def per_variant_lines(df: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str,
                      reference: str | None = BASELINE, ncols: int = 5) -> plt.Figure:
    """Small multiples: one panel per variant (in the frame's order), one line per layer (the mean over
    seeds, the band their range), the y axis shared; in every other panel the `reference` variant's lines
    in light grey, to read each variant against it. `df`: variant, layer, seed, `x`, `y`.

    The statistics are one groupby (seaborn's per-group aggregation took seconds for 10 variants × 3
    layers × 127 positions)."""
    stats = (df.groupby(["variant", "layer", x], sort=False)[y].agg(["mean", "min", "max"]).reset_index()
             .sort_values(x, kind="stable"))
    variants = list(dict.fromkeys(df["variant"]))
    palette = layer_palette(df["layer"])
    ncols = min(ncols, len(variants))
    nrows = -(-len(variants) // ncols)
    height = 2.6 if nrows == 1 and ncols <= 2 else 1.45 * nrows + 0.3
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH_IN, height), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")
    has_reference = reference in variants and len(variants) > 1
    for ax, name in zip(axes.flat, variants):
        for layer, colour in palette.items():
            if has_reference and name != reference:
                r = stats[(stats["variant"] == reference) & (stats["layer"] == layer)]
                ax.plot(r[x], r["mean"], color="0.7", lw=0.8, zorder=1)
            g = stats[(stats["variant"] == name) & (stats["layer"] == layer)]
            ax.plot(g[x], g["mean"], color=colour, lw=1.1, label=layer_label(layer), zorder=3)
            ax.fill_between(g[x], g["min"], g["max"], color=colour, alpha=0.25, lw=0, zorder=2)
        ax.set_title(name, fontsize=8 if ncols > 2 else 10)
        ax.tick_params(labelsize=7 if ncols > 2 else 9)
        ax.xaxis.set_major_locator(plt.MaxNLocator(3 if ncols > 2 else 5, steps=[1, 2, 2.5, 5, 10]))
    for ax in axes.flat[len(variants):]:
        ax.set_axis_off()
    fig.supxlabel(xlabel, fontsize=10)
    fig.supylabel(ylabel, fontsize=9)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if has_reference:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="0.7", lw=0.8))
        labels.append(f"{reference} (same layers)")
    _legend_outside(fig, handles, labels, fontsize=8, above=True)
    return fig


def training_curves(df: pd.DataFrame, metric: str = "losses/total") -> plt.Figure:
    """Training loss against step: one panel per variant, one line per layer (mean and range over seeds).

    `df` is tidy (variant, layer, seed, step, metric, value), as `posae.checkpoint.metrics_frame` gives."""
    return per_variant_lines(df[df["metric"] == metric], "step", "value", "optimizer step",
                             f"{metric.split('/')[-1]} training loss per token")


def mse_by_position(by_position: pd.DataFrame, variants: list[str] | None = None) -> plt.Figure:
    """Validation MSE (normalised scale) at each position: one panel per variant, one line per layer (band:
    range over seeds), the baseline in grey behind. `by_position` is
    `posae.eval.metrics.evaluate_all(...).by_position`."""
    df = by_position if variants is None else by_position[by_position["variant"].isin(variants)]
    return per_variant_lines(df, "position", "mse", "position in sequence (tokens)", "validation MSE per element")


# --------------------------------------------------------------------------- evaluation (04) and ablations (05)

ACCURACY_LABELS = {"acc_global": "global group", "acc_position": "position group",
                   "acc_position_x": "position group, input shuffled", "acc_all": "all features",
                   "acc_raw": "raw activations"}


def probe_accuracies(probes: pd.DataFrame) -> plt.Figure:
    """Held-out probe accuracy per variant and feature set, mean (dot) and range (line) over seeds, one panel
    per layer. `probes` is probes.csv (`posae.eval.probes.probe_all`); the dashed line is chance (1/buckets)."""
    df = probes.assign(variant=_variant_labels(probes))
    order = list(dict.fromkeys(df["variant"]))
    layers = ordered_layers(df["layer"])
    colours = dict(zip(ACCURACY_LABELS, colorblind(len(ACCURACY_LABELS))))
    fig, axes = plt.subplots(1, len(layers), figsize=(PAGE_WIDTH_IN, 0.26 * len(order) + 1.0), sharey=True,
                             squeeze=False, layout="constrained")
    offsets = np.linspace(-0.3, 0.3, len(ACCURACY_LABELS))
    for ax, layer in zip(axes[0], layers):
        stats = df[df["layer"] == layer].groupby("variant")[list(ACCURACY_LABELS)].agg(["mean", "min", "max"])
        stats = stats.reindex(order)
        for (column, label), dy in zip(ACCURACY_LABELS.items(), offsets):
            y = np.arange(len(order)) + dy
            ax.hlines(y, stats[(column, "min")], stats[(column, "max")], color=colours[column], lw=1)
            ax.scatter(stats[(column, "mean")], y, s=9, color=colours[column], label=label, zorder=3)
        ax.axvline(float(probes["chance"].iloc[0]), color="grey", ls="--", lw=1)
        ax.set(xlim=(-0.02, 1.02), xticks=[0, 0.25, 0.5, 0.75, 1], xticklabels=["0", "", "0.5", "", "1"],
               title=layer_label(layer))
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(range(len(order)), order)
    axes[0][0].set_ylim(len(order) - 0.5, -0.5)
    fig.supxlabel("held-out accuracy of the position-bucket probe (dashed: chance)", fontsize=10)
    _legend_outside(fig, *axes[0][0].get_legend_handles_labels(), ncol=3, fontsize=8, above=True)
    return fig


def unlearning_scores(probes: pd.DataFrame) -> plt.Figure:
    """U with the SAE's position input kept beside U_x (input neutralised): one dot per run, coloured by layer,
    a black bar at the mean over runs; grey crosses are U_x's null (the same probes with the labels permuted
    within sequences, unclipped). † = arbitrary halves."""
    df = probes.assign(variant=_variant_labels(probes))
    order = list(dict.fromkeys(df["variant"]))
    palette = layer_palette(df["layer"])
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 0.32 * len(order) + 1.6), sharey=True, layout="constrained")
    panels = (("U", "U, SAE position input kept", None), ("U_x", "U_x, position input neutralised", "D_x_null"))
    rows = df["variant"].map({v: i for i, v in enumerate(order)}).to_numpy()
    # seeded (seaborn's stripplot draws its jitter from numpy's global state: each drawing was another file)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(df))
    for ax, (column, title, null) in zip(axes, panels):
        for layer in palette:
            pick = (df["layer"] == layer).to_numpy()
            ax.scatter(df.loc[pick, column], rows[pick] + jitter[pick], s=16, linewidths=0, color=palette[layer],
                       zorder=2, label=layer_label(layer) if ax is axes[0] else None)
        ax.set_yticks(range(len(order)), order)
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.grid(False, axis="y")  # a category axis: no lines through the rows of dots
        means = df.groupby("variant", sort=False)[column].mean().reindex(order)
        ax.scatter(means.to_numpy(), range(len(order)), marker="|", s=300, color="black", zorder=3,
                   label="mean over runs")
        if null is not None:
            ax.scatter(df[null], rows + 0.3, marker="x", s=12,
                       color="grey", lw=0.8, label="null (unclipped)")
        ax.axvline(0, color="black", lw=0.8)
        ax.set(xlim=(-0.1, 1.0), xlabel=column, ylabel="", title=title)
    legend: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(layer_label(lab) if lab.isdigit() else lab, h)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    labels, handles = list(legend), list(legend.values())
    _legend_outside(fig, handles, labels, fontsize=9)
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


def position_share_histograms(features: pd.DataFrame, threshold: float = 0.5, ncols: int = 5) -> plt.Figure:
    """Per variant, the distribution of each feature's position-variance share, one colour per group.

    `features` is `posae.eval.metrics.evaluate_all(...).features` (every layer and seed pooled); each
    group's bars sum to 100% (log scale: an empty bin is not drawn), dead features (share undefined) are
    left out; the dashed line is `threshold`.
    """
    df = features.dropna(subset=["position_share"]).assign(variant=_variant_labels(features))
    variants = list(dict.fromkeys(df["variant"]))
    groups = list(dict.fromkeys(df["group"]))
    colours = dict(zip(groups, colorblind(len(groups))))
    ncols = min(ncols, len(variants))
    nrows = -(-len(variants) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH_IN, 1.45 * nrows + 0.5), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")
    bins = np.linspace(0, 1, 21)
    for ax, name in zip(axes.flat, variants):
        for group, colour in colours.items():
            values = df.loc[(df["variant"] == name) & (df["group"] == group), "position_share"]
            if len(values):
                ax.hist(values, bins=bins, weights=np.full(len(values), 100 / len(values)), histtype="step",
                        color=colour, lw=1.2, label=group)
        ax.axvline(threshold, color="grey", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set(xlim=(0, 1), xticks=[0, 0.5, 1])
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(variants):]:
        ax.set_axis_off()
    fig.supylabel("features (%)", fontsize=10)
    fig.supxlabel("share of a feature's activation variance explained by position\n"
                  "(between-position / total variance)", fontsize=9)
    _legend_outside(fig, *axes.flat[0].get_legend_handles_labels(), fontsize=8, above=True)
    return fig


ABLATION_TITLES = {
    "global_magnitude_share": "Share of activation magnitude in global features",
    "gate_activation": "Gate activation after training",
    "position_weighting": "Effect of position-weighted loss scaling on validation MSE",
    "resampled_fraction": "Features resampled during training",
    "mask_activation": "Soft mask after training (beyond the paper)",
}


def ablation(runs: pd.DataFrame, name: str, paper: tuple | None, xlabel: str, percent: bool = False,
             title: str | None = None) -> plt.Figure:
    """One ablation: per variant, each run as a dot (colour = layer), the median as a black tick and the
    range over runs as a black line, the median also written right of the axes; the paper's mean ± std as a
    red band. `runs` is ablations_runs.csv; `paper` starts with (mean, std, text), as
    `posae.paper.PAPER_ABLATIONS` entries do, or is None where the paper has no figure; `title` defaults to
    `ABLATION_TITLES[name]`."""
    df = runs[runs["ablation"] == name].dropna(subset=["value"])
    scale = 100.0 if percent else 1.0
    df = df.assign(value=df["value"] * scale)
    order = list(dict.fromkeys(df["variant"]))
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 0.32 * max(len(order), 2) + 1.3), layout="constrained")
    handles, labels = [], []
    if paper is not None:
        mean, std, text = paper[:3]
        handles.append(ax.axvspan((mean - std) * scale, (mean + std) * scale, color="tab:red", alpha=0.15))
        ax.axvline(mean * scale, color="tab:red", lw=1)
        labels.append(f"paper: {text}")
    runs_median_range(ax, df, order, labels="{:.1f}%" if percent else "{:.3f}")
    more_handles, more_labels = _runs_legend_handles(ax)
    ax.set(xlabel=xlabel + (" (%)" if percent else ""), ylabel="", title=title or ABLATION_TITLES.get(name, name))
    _legend_outside(fig, more_handles + handles, more_labels + labels, fontsize=8)
    return fig


# --------------------------------------------------------------------------- figures of the paper (06)


def mse_ratio(table: pd.DataFrame, ratios: pd.DataFrame) -> plt.Figure:
    """Validation MSE of each variant over the baseline's (log scale): ours per run (paired by layer and
    seed; dots coloured by layer, median and range) beside the paper's mean ± std (its std propagated from
    Table 1's). `table` is `posae.report.tables.table1` (the rows and the paper's columns), `ratios`
    `posae.report.tables.paired_ratio` (variant, layer, seed, ratio)."""
    df = table.dropna(subset=["mse_ratio_mean"]).reset_index(drop=True)
    order = list(df["variant"])
    runs = ratios[ratios["variant"].isin(order)]
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 0.3 * max(len(df), 2) + 1.5), layout="constrained")
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    runs_median_range(ax, runs, order, x="ratio")
    y = np.arange(len(order)) + 0.3
    paper = ax.errorbar(df["paper_mse_ratio_mean"], y, xerr=df["paper_mse_ratio_std"].fillna(0), fmt="D",
                        color="tab:red", ms=3.5, capsize=2, lw=1)
    ax.set_xscale("log", base=2)
    lo, hi = ax.get_xlim()
    ticks = (0.125, 0.25, 0.5, 1, 2, 4, 8) if hi / lo > 3 else (0.5, 0.7, 0.8, 0.9, 1, 1.1, 1.25, 1.5, 2)
    ticks = [t for t in ticks if lo <= t <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlim(lo, hi)
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set(xlabel="validation MSE / the baseline's at the same layer and seed (log scale)", ylabel="",
           title="Reconstruction cost of position awareness (dashed: the baseline)")
    handles, labels = _runs_legend_handles(ax)
    _legend_outside(fig, handles + [paper], labels + ["paper, mean ± std (Table 1, §6.1)"], fontsize=8)
    return fig


def placeholder(text: str) -> plt.Figure:
    """A figure that says why there is nothing to draw (e.g. no trained variant has the quantity)."""
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 1.2))
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()
    return fig
