"""The figures registry and the writers of notebook 06's products, from runs/<config>/ alone: no training, no model.

Everything is written under `figures_dir(config)`, ``figures/<config>/`` at the repository root
(``$POSAE_FIGURES/<config>`` when that is set, as the tests do):

    fig1a_training_curves.{png,pdf}      training loss against step, a panel per variant, a line per layer
    fig1b_unlearning_score.{png,pdf}     U (position input kept) beside U_x (neutralised), per run (paper: 0.0)
    probe_accuracies.{png,pdf}           the probe accuracies behind U and U_x
    mse_ratio.{png,pdf}                  validation MSE relative to the baseline, per run, beside the paper's
    mse_by_position.{png,pdf}            validation MSE at each position, a panel per variant
    ablation_<name>.{png,pdf}            the ablations of §6.3 (`posae.paper.PAPER_ABLATIONS`), the paper's value marked
    position_structure.{png,pdf}         raw activations (notebook 02): norm by position, raw probe accuracy
    table1.{csv,md}                      Table 1: per variant, our statistics beside the paper's numbers
    table1_by_layer.{csv,md}             the same statistics per variant and layer, mean ± se over seeds
    claims.{csv,md}                      each claim of the paper, our value, the paper's, and a verdict
    run_info.json                        config, machine, stage timings and wall time of the run

Notebook 04 (the probe stage) writes one figure of its own there, declared as that stage's product
(`PROBE_FIGURES`, `probe_outputs`):

    position_share.{png,pdf}             per variant, the histogram of each feature's position-variance share

A figure is one registered function (`@figure(stem, caption)`): notebook 06 draws every entry of
`FIGURES` in one loop, and `expected_outputs` / `check_outputs` (and the driver's product list) derive
from the same registry, so a new figure touches this file only. The tables are `posae.report.tables`,
the verdicts `posae.report.claims`, the drawing `posae.report.plots`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, NamedTuple

import matplotlib.pyplot as plt
import pandas as pd

from posae.config import Config
from posae.paper import PAPER_ABLATIONS
from posae.paths import REPO_ROOT, run_dir, write_csv_atomic, write_json_atomic, write_text_atomic
from posae.report import plots
from posae.report.claims import claims, claims_markdown
from posae.report.tables import RunTables, paired_ratio, table1, table1_by_layer_markdown, table1_markdown

TABLES = ("table1.csv", "table1.md", "table1_by_layer.csv", "table1_by_layer.md", "claims.csv", "claims.md",
          "run_info.json")
POSITION_SHARE = "position_share"  # notebook 04's histogram of the features' position-variance shares
PROBE_FIGURES = (POSITION_SHARE,)  # drawn and saved by notebook 04, not by notebook 06


# Captions: what notebook 06 shows above each figure (Markdown).
CAPTION_FIG1A = """\
## Figure 1a · Training trajectories

The paper: *"Training trajectories showing consistent convergence"* for every variant (its losses
on an unstated scale). Ours: the total training loss against the optimizer step, one panel per
variant, one line per layer (the mean over seeds, the band their range), the baseline's lines in
grey behind every other variant; the y axis is shared. The loss is eq. 7 as
written (unsquared reconstruction error weighted by w_t, plus λ1‖f‖₁) plus each variant's own
terms, so a variant with an extra loss (contrastive's InfoNCE) or another λ1 (the soft-masking
pair) sits at its own level: compare the shapes, not the heights."""

CAPTION_FIG1B = """\
## Figure 1b · Unlearning score

The paper: *"Unlearning scores remained at 0.0 across all configurations"* (Table 1, §6.4), for a
score it defines only in words. Left, the paper's measurement as we read it: U = clip((acc_P −
acc_G)/(1 − chance), 0, 1) from held-out position-bucket probes on the position and the global
feature groups, each token's own position fed to the SAE. Right, U_x: the same probes with the
SAE's position input neutralised (positions shuffled across tokens), which credits only position
information the activation carries; an SAE that echoes its position input scores U ≈ 1 and U_x ≈ 0
(docs/decisions.md §7; the planted controls of notebook 00). Dots are runs, one colour per layer;
black bars the mean; grey crosses U_x's null (labels permuted within sequences). "U = 0" is judged on
U_x against its null (claims.md). † marks variants without learned groups, scored on an arbitrary
half split."""

CAPTION_PROBES = """\
The accuracies behind U and U_x, per feature set and layer (dashed: chance), mean and range over
seeds. U is near 0 whenever the global group predicts position about as well as the position group,
whatever the level; "input shuffled" is the position group fed shuffled positions (U_x's); the raw
activations give what a linear probe can read from the model."""

CAPTION_MSE_RATIO = """\
## MSE relative to the baseline

The same ratios as a figure, on a log scale: ours per run (a dot per layer-and-seed pair, coloured
by layer; black: their median and range) beside the paper's (red, mean ± std, its std propagated
from the two MSE stds). Left of the dashed line a variant reconstructs better than the baseline."""

CAPTION_MSE_BY_POSITION = """\
## MSE by position

Validation MSE at each position in the context, one panel per variant, one line per layer (band:
range over seeds), the baseline's lines in grey behind. The paper shows no such figure; it tells whether a position-aware variant
reconstructs some positions better than the baseline does, and where the loss weights
w_t = 1 + t/L of position_weighted move the error."""

CAPTION_ABLATIONS = """\
## Ablations of §6.3

The paper, on its hierarchical model: global features carry *73% ± 5%* of the activation
magnitude; the gate averages *0.12 ± 0.03*; position-weighted loss scaling changes MSE by *±2%*;
resampling touches *8% ± 2%* of the features. Each figure shows every run (dot, colour = layer),
the median over runs (black tick, its value written on the right) and their range (black line),
and the paper's mean ± std (red band). Our gate starts at
σ(0) = 0.5; the paper's 0.12 is σ(−2), which a gate initialised there and never trained would show.
The last figure, soft masking's learned mask, is beyond the paper. Notebook 05 explains each
measurement."""

CAPTION_POSITION_STRUCTURE = """\
## Position in the raw activations (notebook 02)

Before any SAE: the mean norm of the normalised activation (centred, scaled so the mean squared
norm is d, the SAE's input) at each position, per layer, and the held-out accuracy of the
position-bucket probe on the activations themselves (its value on each bar; dashed: chance). A probe well above chance
means position is linearly readable, so an SAE could in principle give it features of its own.
The paper reports no such baseline."""


# --------------------------------------------------------------------------- the registry


class Figure(NamedTuple):
    stem: str  # <stem>.png and <stem>.pdf under figures/<config>/
    draw: Callable[[RunTables], plt.Figure]
    caption: str  # Markdown, shown above the figure in notebook 06


FIGURES: dict[str, Figure] = {}


def figure(stem: str, caption: str) -> Callable:
    """Register a figure: `fn(tables) -> matplotlib Figure` is drawn by notebook 06 as `<stem>.{png,pdf}`."""
    def register(fn: Callable[[RunTables], plt.Figure]) -> Callable[[RunTables], plt.Figure]:
        if stem in FIGURES:
            raise ValueError(f"figure {stem!r} registered twice")
        FIGURES[stem] = Figure(stem, fn, caption)
        return fn
    return register


# --------------------------------------------------------------------------- the figures, in notebook order


@figure("fig1a_training_curves", CAPTION_FIG1A)
def _training(t: RunTables, metric: str = "losses/total") -> plt.Figure:
    return plots.per_variant_lines(t.training[t.training["metric"] == metric], "step", "value", "optimizer step",
                                   "training loss per token (eq. 7 + variant terms)")


@figure("fig1b_unlearning_score", CAPTION_FIG1B)
def _unlearning(t: RunTables) -> plt.Figure:
    return plots.unlearning_scores(t.probes)


@figure("probe_accuracies", CAPTION_PROBES)
def _probe_accuracies(t: RunTables) -> plt.Figure:
    return plots.probe_accuracies(t.probes)


@figure("mse_ratio", CAPTION_MSE_RATIO)
def _mse_ratio(t: RunTables) -> plt.Figure:
    return plots.mse_ratio(table1(t), paired_ratio(t.metrics))


@figure("mse_by_position", CAPTION_MSE_BY_POSITION)
def _mse_by_position(t: RunTables) -> plt.Figure:
    return plots.mse_by_position(t.by_position)


# ablation -> (x-axis label, shown in percent)
ABLATION_AXES = {
    "global_magnitude_share": ("share of Σ‖f‖₁ carried by global features", True),
    "gate_activation": ("mean gate σ(G) after training", False),
    "position_weighting": ("change of validation MSE with the loss weights w_t on vs off", True),
    "resampled_fraction": ("features resampled at least once", True),
    "mask_activation": ("mean soft mask σ(M) after training (beyond the paper)", False),
}


def ablation_figure(runs: pd.DataFrame, name: str) -> plt.Figure:
    """The figure of ablation `name` (a key of `ABLATION_AXES`) from ablations_runs.csv, as notebooks 05 and
    06 draw it: its axis, its title and the paper's value, or a placeholder saying no run has it."""
    xlabel, percent = ABLATION_AXES[name]
    if runs.empty or not runs.loc[runs["ablation"] == name, "value"].notna().any():
        return plots.placeholder(f"{name}: no trained variant has this quantity")
    return plots.ablation(runs, name, PAPER_ABLATIONS[name], xlabel, percent)


for _i, _name in enumerate(ABLATION_AXES):
    figure(f"ablation_{_name}", (CAPTION_ABLATIONS + "\n\n" if _i == 0 else "") + f"`ablation_{_name}`: "
           f"{ABLATION_AXES[_name][0]}.")(lambda t, _name=_name: ablation_figure(t.ablation_runs, _name))


@figure("position_structure", CAPTION_POSITION_STRUCTURE)
def _position_structure(t: RunTables) -> plt.Figure:
    raw = t.probes.groupby("layer", as_index=False).agg(acc_raw=("acc_raw", "first"), chance=("chance", "first"))
    return plots.position_structure(t.norms, raw)


# --------------------------------------------------------------------------- writing


def draw(stem: str, tables: RunTables, out: Path) -> plt.Figure:
    """Draw the figure `stem` (a key of `FIGURES`), write `<out>/<stem>.png` and `.pdf`, return it."""
    fig = FIGURES[stem].draw(tables)
    plots.save(fig, Path(out) / stem)
    return fig


def write_table1(tables: RunTables, out: Path) -> pd.DataFrame:
    """table1.{csv,md} (pooled over layers) and table1_by_layer.{csv,md}; returns the pooled table."""
    table = table1(tables)
    write_csv_atomic(table, Path(out) / "table1.csv")
    write_text_atomic(Path(out) / "table1.md", table1_markdown(table))
    by_layer = table1(tables, by_layer=True)
    write_csv_atomic(by_layer, Path(out) / "table1_by_layer.csv")
    write_text_atomic(Path(out) / "table1_by_layer.md", table1_by_layer_markdown(by_layer))
    return table


def write_claims(tables: RunTables, table: pd.DataFrame, out: Path) -> pd.DataFrame:
    df = claims(tables, table)
    write_csv_atomic(df, Path(out) / "claims.csv")
    write_text_atomic(Path(out) / "claims.md", claims_markdown(df))
    return df


def reproduction_info(cfg: Config, running: tuple[str, ...] = ("figures",)) -> dict:
    """Config, machine and timings of the reproduction under runs/<config>/, from the driver's stage records
    (figures/<config>/run_info.json; not a training run's run_info.json, `posae.train.run_info`).

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


def write_reproduction_info(cfg: Config, out: Path) -> dict:
    info = reproduction_info(cfg)
    write_json_atomic(Path(out) / "run_info.json", info)
    return info


def probe_outputs(out: Path) -> list[Path]:
    """The figures notebook 04 saves under `out` (figures/<config>/): the probe stage's, not notebook 06's."""
    return [Path(out) / f"{stem}.{ext}" for stem in PROBE_FIGURES for ext in ("png", "pdf")]


def expected_outputs(out: Path) -> list[Path]:
    out = Path(out)
    return [out / f"{stem}.{ext}" for stem in FIGURES for ext in ("png", "pdf")] + [out / name for name in TABLES]


def check_outputs(out: Path) -> list[Path]:
    """Every expected output under `out`, or an error naming the missing ones."""
    missing = [p.name for p in expected_outputs(out) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{out}: missing {', '.join(missing)}. Fix: run notebooks/06_figures.ipynb to the end")
    return expected_outputs(out)
