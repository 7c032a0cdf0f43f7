"""Notebook 06's products on the shared smoke reproduction, and the verdict rules on hand-made numbers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from posae import paths
from posae.paper import PAPER_TABLE1
from posae.paths import REPO_ROOT
from posae.report import figures
from posae.report.claims import (BUDGET, CANNOT, DIFFERS, HOLDS, VERDICTS, above_null, claims, combine, confidence_interval,
                                 extremes_verdict, interval_verdict, reachable)
from posae.report.tables import RunTables, paper_ratio, table1, table1_markdown
from posae.saes import REGISTRY

# --------------------------------------------------------------------------- the smoke reproduction


@pytest.fixture(scope="module")
def smoke_figures(smoke_reproduction) -> Path:
    return paths.figures_dir("smoke")


def test_figures_go_to_the_test_folder_not_the_repository(smoke_figures):
    assert smoke_figures == Path(os.environ[paths.FIGURES_ENV]) / "smoke"
    assert not smoke_figures.is_relative_to(REPO_ROOT)


def test_every_figure_exists_as_png_and_pdf_and_is_not_empty(smoke_figures):
    for stem in figures.FIGURES:
        assert (smoke_figures / f"{stem}.png").stat().st_size > 10_000, stem
        assert (smoke_figures / f"{stem}.pdf").stat().st_size > 5_000, stem
    assert figures.check_outputs(smoke_figures)


def test_table1_has_one_row_per_registered_variant_with_finite_mse(smoke_figures):
    table = pd.read_csv(smoke_figures / "table1.csv")
    assert sorted(table["variant"]) == sorted(REGISTRY)
    assert np.isfinite(table["mse_mean"]).all() and np.isfinite(table["mse_std"]).all()
    assert table.loc[table["variant"] == "baseline", "mse_ratio_mean"].item() == pytest.approx(1.0)
    assert table.loc[table["variant"] == "baseline", "paper_mse_mean"].item() == 1.44


def test_table1_markdown_sets_the_paper_beside_ours(smoke_figures):
    header = (smoke_figures / "table1.md").read_text().splitlines()[0]
    for column in ("MSE", "paper MSE", "MSE / baseline", "paper MSE / baseline", "paper U", "acc_raw", "U_x",
                   "U, input kept", "CE score", "KL"):
        assert f"| {column} |" in header


def test_every_claim_has_one_of_the_verdicts(smoke_figures):
    df = pd.read_csv(smoke_figures / "claims.csv")
    assert set(df["verdict"]) <= set(VERDICTS)
    assert len(df) == 11 and df["reason"].str.len().min() > 10 and df["test"].fillna("").str.len().min() > 3
    assert df.loc[df["claim"].str.startswith("MSE between"), "verdict"].item() == CANNOT
    assert "**" in (smoke_figures / "claims.md").read_text()


def test_run_info_names_the_config_the_machine_and_the_stage_times(smoke_figures):
    info = json.loads((smoke_figures / "run_info.json").read_text())
    assert info["config"] == "smoke" and info["config_source"] == "params/smoke.yaml"
    assert info["machine"]["cpu_count"] >= 1
    stages = [s["stage"] for s in info["stages"]]
    assert stages[:2] == ["ground_truth", "capture"] and "figures" not in stages
    assert info["wall_seconds"] >= max(s["seconds"] for s in info["stages"]) > 0


# --------------------------------------------------------------------------- verdict rules


@pytest.mark.parametrize("mean, std, runs, low, high, expected", [
    (0.72, 0.01, 6, 0.68, 0.78, HOLDS),  # inside
    (0.60, 0.05, 6, 0.68, 0.78, DIFFERS),  # CI 0.60 ± 0.052 reaches 0.652
    (0.64, 0.04, 6, 0.68, 0.78, HOLDS),  # CI 0.64 ± 0.042 reaches 0.682
    (0.64, 0.04, 2, 0.68, 0.78, HOLDS),  # two runs: t(0.975, 1) = 12.7, a wide interval
    (0.50, math.nan, 1, 0.09, 0.15, DIFFERS),  # one run: its point
    (0.12, math.nan, 1, 0.09, 0.15, HOLDS),
    (math.nan, 0.01, 6, 0.09, 0.15, CANNOT),  # nothing measured
    (-0.03, 0.005, 6, -0.02, 0.02, DIFFERS),
])
def test_interval_verdict(mean, std, runs, low, high, expected):
    assert interval_verdict(mean, std, runs, low, high) == expected


def test_confidence_interval_is_students_t_over_runs():
    lo, hi = confidence_interval(1.0, 0.5, 6)
    assert (hi - lo) / 2 == pytest.approx(2.5706 * 0.5 / math.sqrt(6), rel=1e-4)
    assert confidence_interval(1.0, math.nan, 1) == (1.0, 1.0)


def test_above_null_is_a_one_sided_t_test_corrected_for_the_variants():
    rng = np.random.default_rng(0)
    planted = 0.05 + rng.normal(0, 0.005, 6)  # a real excess, small but steady
    t, p, significant = above_null(planted, tests=10)
    assert t > 10 and significant
    null = rng.normal(0, 0.01, 6)
    assert not above_null(null - null.mean(), tests=10)[2]  # mean exactly 0
    assert not above_null(-planted, tests=10)[2]  # below the null is not above it
    assert above_null(np.array([0.1]), tests=1) == (pytest.approx(math.nan, nan_ok=True),) * 2 + (False,)
    t, p, _ = above_null(np.array([0.02, 0.03, 0.025, 0.035]), tests=1)
    assert p == pytest.approx(float(__import__("scipy").stats.ttest_1samp([0.02, 0.03, 0.025, 0.035], 0,
                                                                          alternative="greater").pvalue))


def test_combine_any_difference_wins_then_any_hold():
    assert combine([HOLDS, DIFFERS, CANNOT]) == DIFFERS
    assert combine([HOLDS, CANNOT]) == HOLDS
    assert combine([CANNOT, CANNOT]) == CANNOT
    assert combine([]) == CANNOT


def test_extremes_verdict_reads_only_the_lowest_and_highest():
    paper = {"a": 1.0, "b": 1.5, "c": 1.6, "d": 2.0}
    assert extremes_verdict({"a": 0.1, "b": 0.3, "c": 0.2, "d": 0.5}, paper) == HOLDS  # b, c swapped
    assert extremes_verdict({"a": 0.3, "b": 0.1, "c": 0.2, "d": 0.5}, paper) == DIFFERS
    assert extremes_verdict({"a": 0.1, "b": 0.3, "c": 0.6, "d": 0.5}, paper) == DIFFERS
    assert extremes_verdict({"a": 0.3}, paper) == CANNOT


def test_paper_ratios_are_those_of_spec_section_9():
    ratios = {v: round(paper_ratio(v)[0], 2) for v in PAPER_TABLE1}
    assert ratios == {"baseline": 1.0, "soft_masking": 1.06, "hierarchical": 1.06, "contrastive": 1.08,
                      "multiscale": 1.1, "position_masking": 1.13, "soft_masking_sparse": 1.1}
    assert paper_ratio("baseline")[1] == 0.0
    assert all(math.isnan(x) for x in paper_ratio("residual"))  # not in the paper


# --------------------------------------------------------------------------- table and claims on hand-made runs


def make_tables(mse: dict[str, float], l1: float = 0.05, U: float = 0.0, share: float = 0.72,
                gate: float | None = 0.5, U_x: float = 0.0, budget: float = math.nan) -> RunTables:
    """Two layers × two seeds per variant; MSE per variant (+1% on layer 1), everything else constant but the
    null, which varies by ±0.004 around 0 (so U_x's test has a spread)."""
    rows, probes, fidelity = [], [], []
    for v, m in mse.items():
        for layer in (0, 1):
            for seed in (0, 1):
                rows.append({"variant": v, "layer": layer, "seed": seed, "grouping": "learned",
                             "val/mse": m * (1.01 if layer else 1.0) + 0.001 * seed, "sparsity/mean_activation": l1,
                             "sparsity/l0": 10.0, "val/explained_variance": 1 - m, "sparsity/dead_fraction": 0.0})
                null = 0.004 * (1 if (layer + seed) % 2 else -1) + 0.001 * layer
                probes.append({"variant": v, "layer": layer, "seed": seed, "grouping": "learned", "acc_global": 0.5,
                               "acc_position": 0.5, "acc_all": 0.5, "acc_raw": 0.6, "U": U, "U_x": U_x, "D_x": U_x,
                               "D_x_null": null, "chance": 0.125, "train_tokens": 6400, "test_tokens": 1600})
                fidelity.append({"variant": v, "layer": layer, "seed": seed, "ce_score": 0.9, "kl_spliced": 0.1})
    summary = [{"ablation": "global_magnitude_share", "variant": "hierarchical", "mean": share, "std": 0.01,
                "runs": 4, "start": math.nan},
               {"ablation": "position_weighting", "variant": "hierarchical", "mean": 0.01, "std": 0.005,
                "runs": 4, "start": math.nan}]
    if gate is not None:
        summary.append({"ablation": "gate_activation", "variant": "hierarchical", "mean": gate, "std": 0.001,
                        "runs": 4, "start": 0.5, "budget": budget, "moved": 0.3})
    empty = pd.DataFrame()
    return RunTables(pd.DataFrame(rows), empty, pd.DataFrame(probes), pd.DataFrame(summary), empty, empty, empty,
                     pd.DataFrame(fidelity))


def test_table1_pairs_the_ratio_by_layer_and_seed_and_lists_every_variant():
    tables = make_tables({"baseline": 0.20, "hierarchical": 0.22})
    table = table1(tables).set_index("variant")
    assert sorted(table.index) == sorted(REGISTRY)
    # Layer 1 is 1% worse for both variants: paired, the ratio is 1.1 on every pair (std ~0).
    assert table.at["hierarchical", "mse_ratio_mean"] == pytest.approx(1.1, rel=1e-2)
    assert table.at["hierarchical", "mse_ratio_std"] < 1e-2
    assert table.at["residual", "runs"] == 0 and math.isnan(table.at["residual", "mse_mean"])
    assert table.at["hierarchical", "paper_mse_ratio_mean"] == pytest.approx(1.52 / 1.44)
    md = table1_markdown(table.reset_index())
    assert "| residual | 0 | — |" in md


def test_claims_on_hand_made_numbers():
    tables = make_tables({"baseline": 0.20, "position_masking": 0.30, "hierarchical": 0.21, "position_weighted": 0.2},
                         l1=0.05, U=0.0, share=0.72, gate=0.5)
    df = claims(tables).set_index("claim")
    verdict = {c.split(" ")[0] + " " + c.split(" ")[1]: v for c, v in df["verdict"].items()}
    assert verdict["MSE between"] == CANNOT  # the paper's scale is unstated
    assert verdict["MSE ordering:"] == HOLDS  # baseline lowest, position_masking highest
    assert verdict["MSE relative"] == DIFFERS  # position_masking 1.5 against 1.13 ± 0.06
    assert verdict["sparsity L1"] == HOLDS  # 0.05 < 0.1 everywhere
    assert verdict["unlearning score"] == HOLDS
    assert verdict["global features"] == HOLDS  # 72% ± 1% against 73% ± 5%
    assert verdict["mean gate"] == DIFFERS  # 0.5 against 0.12 ± 0.03
    assert verdict["position-weighted loss"] == HOLDS  # +1% within ±2%
    assert verdict["resampling affects"] == CANNOT  # not measured
    ratio_reason = df.loc[df.index.str.startswith("MSE relative"), "reason"].item()
    assert "position_masking" in ratio_reason.split(";")[0] and "not measured" in ratio_reason


def test_reachable_gate_range_from_its_start_and_the_budget():
    assert reachable(0.5, 0.0) == (0.5, 0.5)
    lo, hi = reachable(0.5, 0.497)
    assert lo == pytest.approx(1 / (1 + math.exp(0.497))) and hi == pytest.approx(1 - lo)
    assert all(math.isnan(v) for v in reachable(0.5, math.nan))


def test_a_gate_claim_beyond_the_budget_cannot_be_judged_and_within_it_is_judged():
    def gate_row(budget: float, gate: float = 0.5) -> pd.Series:
        df = claims(make_tables({"baseline": 0.2, "hierarchical": 0.21}, gate=gate, budget=budget))
        return df.loc[df["claim"].str.startswith("mean gate")].iloc[0]

    short = gate_row(0.497)  # σ(0 ± 0.497) = [0.378, 0.622]: the paper's [0.09, 0.15] is out of reach
    assert short["verdict"] == BUDGET and "0.378" in short["reason"] and "reach" in short["test"]
    assert gate_row(5.0)["verdict"] == DIFFERS  # reachable, and 0.5 is outside the paper's interval
    assert gate_row(5.0, gate=0.12)["verdict"] == HOLDS
    assert gate_row(math.nan)["verdict"] == DIFFERS  # no budget recorded: judged as before


def test_U_zero_is_judged_on_U_x_against_its_null_not_on_the_kept_input_U():
    # A large U with the position input kept but U_x at the null: the echo an SAE's own input gives. It holds.
    echo = claims(make_tables({"baseline": 0.2, "hierarchical": 0.21}, U=0.6, U_x=0.0))
    row = echo.loc[echo["claim"].str.startswith("unlearning")].iloc[0]
    assert row["verdict"] == HOLDS and "input kept" in row["reason"] and "t-test" in row["test"]
    # A small but steady U_x above its null differs, though it is far below the kept-input U of the echo.
    steady = claims(make_tables({"baseline": 0.2, "hierarchical": 0.21}, U=0.05, U_x=0.03))
    assert steady.loc[steady["claim"].str.startswith("unlearning"), "verdict"].item() == DIFFERS


def test_table1_by_layer_has_standard_errors_over_seeds():
    table = table1(make_tables({"baseline": 0.20, "hierarchical": 0.22}), by_layer=True)
    row = table[(table["variant"] == "hierarchical") & (table["layer"] == 1)].iloc[0]
    assert row["runs"] == 2 and row["mse_mean"] == pytest.approx(0.22 * 1.01 + 0.0005)
    assert row["mse_se"] == pytest.approx(row["mse_std"] / math.sqrt(2))
    assert row["ce_score_mean"] == pytest.approx(0.9)


# --------------------------------------------------------------------------- the figures themselves, on hand-made runs


def _drawn_tables(layers=(3, 13, 8), variants=("baseline", "hierarchical", "soft_masking")) -> RunTables:
    """Every table a figure reads, for `layers` × two seeds × `variants`, in the order given (layers unsorted)."""
    rng = np.random.default_rng(0)
    runs = [{"variant": v, "layer": layer, "seed": s, "grouping": "arbitrary" if v == "baseline" else "learned"}
            for v in variants for layer in layers for s in (0, 1)]
    metrics = pd.DataFrame([{**r, "val/mse": 0.1 + 0.01 * i} for i, r in enumerate(runs)])
    probes = pd.DataFrame([{**r, "acc_global": 0.2, "acc_position": 0.3, "acc_position_x": 0.2, "acc_all": 0.3,
                            "acc_raw": 0.4, "U": 0.1, "U_x": 0.0, "D_x_null": 0.001, "chance": 0.125} for r in runs])
    curve = lambda key, n: [{**r, key: k} for r in runs for k in range(n)]  # noqa: E731
    by_position = pd.DataFrame(curve("position", 8)).assign(mse=lambda d: 0.1 + 0.001 * d["position"])
    training = pd.DataFrame(curve("step", 5)).assign(metric="losses/total", value=lambda d: 10 - d["step"])
    ablation_runs = pd.DataFrame([{**r, "ablation": name, "value": value} for r in runs for name, value in (
        # bimodal across layers: a mean ± std would reach below 0
        ("resampled_fraction", 0.8 if r["layer"] == 3 else 0.0),
        ("global_magnitude_share", rng.uniform(0.3, 0.6)), ("gate_activation", 0.5),
        ("position_weighting", rng.normal(0, 0.01)), ("mask_activation", 0.5))])
    norms = pd.DataFrame([{"layer": layer, "position": p, "norm_mean": 100.0 * (1 + int(layer)), "norm_std": 1.0,
                           "normalised_norm_mean": 25.0} for layer in layers for p in range(1, 9)])
    return RunTables(metrics, by_position, probes, pd.DataFrame(), ablation_runs, training, norms,
                     pd.DataFrame([{**r, "ce_score": 0.9, "kl_spliced": 0.1} for r in runs]))


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if legend is not None
            for t in legend.get_texts()]


@pytest.fixture(scope="module")
def drawn():
    """stem -> figure, for every registered figure drawn from `_drawn_tables`; closed after the module."""
    import matplotlib.pyplot as plt

    from posae.report import plots

    plots.set_style()
    tables = _drawn_tables()
    out = {stem: entry.draw(tables) for stem, entry in figures.FIGURES.items()}
    yield out
    plt.close("all")


def test_layers_sort_by_number_given_as_numbers_strings_or_labels():
    from posae.report.plots import layer_palette
    from posae.report.tables import ordered_layers

    assert ordered_layers([3, 13, 8, 13]) == [3, 8, 13]
    assert ordered_layers(["13", "3", "8"]) == ["3", "8", "13"]
    assert ordered_layers(["layer 13", "layer 3"]) == ["layer 3", "layer 13"]
    assert sorted(["13", "3", "8"]) == ["13", "3", "8"]  # what a plain sort does, and these must not
    assert list(layer_palette(["13", "3", "8"]).values()) == list(layer_palette([3, 13, 8]).values())
    with pytest.raises(ValueError, match="not a layer number"):
        ordered_layers(["resid"])


def test_table1_by_layer_lists_layers_by_number_even_as_strings():
    tables = _drawn_tables(layers=("3", "13", "8"))
    by_layer = table1(tables, by_layer=True)
    assert list(by_layer.loc[by_layer["variant"] == "baseline", "layer"]) == ["3", "8", "13"]
    from posae.report.tables import _in_variant_order

    assert list(dict.fromkeys(_in_variant_order(tables.metrics)["layer"])) == ["3", "8", "13"]


@pytest.mark.parametrize("layers", [(3, 13, 8), ("3", "13", "8")], ids=["ints", "strings"])
def test_every_figure_orders_its_layers_by_number(layers):
    import matplotlib.pyplot as plt

    tables = _drawn_tables(layers=layers)
    for stem, entry in figures.FIGURES.items():
        fig = entry.draw(tables)
        texts = [t for t in [*_legend_texts(fig), *(ax.get_title() for ax in fig.axes)] if t.startswith("layer ")]
        plt.close(fig)
        shown = list(dict.fromkeys(texts))
        assert shown == ["layer 3", "layer 8", "layer 13"] or shown == [], (stem, shown)
    assert ["layer 3", "layer 13", "layer 8"] != ["layer 3", "layer 8", "layer 13"]  # the given order differs


def test_every_figure_fits_a_page_width(drawn):
    import matplotlib.pyplot as plt

    from posae.report import plots

    widths = {stem: plots.figure_width(fig) for stem, fig in drawn.items()}
    assert all(w <= plots.PAGE_WIDTH_IN for w in widths.values()), widths
    wide, ax = plt.subplots(figsize=(6, 2))
    ax.plot([0, 1], label="a legend outside the axes makes the saved figure wider")
    wide.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    assert plots.figure_width(wide) > plots.PAGE_WIDTH_IN  # the measure sees what bbox "tight" adds
    plt.close(wide)


def test_the_notebooks_figures_fit_a_page_width_too():
    import matplotlib.pyplot as plt

    from posae.report import plots

    t = _drawn_tables()
    features = pd.DataFrame([{**r, "feature": f, "group": g, "position_share": 0.1 * f}
                             for r in t.metrics[["variant", "layer", "seed", "grouping"]].to_dict("records")
                             for f in range(10) for g in ("global", "position")])
    pcs = {layer: (pd.DataFrame({"pc1": np.arange(50.0), "pc2": np.arange(50.0), "position": np.arange(50)}),
                   (0.3, 0.1)) for layer in (13, 3)}
    for fig in (plots.norm_by_position(t.norms), plots.pca_by_position(pcs), plots.position_share_histograms(features),
                plots.training_curves(t.training[t.training["variant"] == "hierarchical"]),
                plots.mse_by_position(t.by_position, ["baseline", "hierarchical"])):
        assert plots.figure_width(fig) <= plots.PAGE_WIDTH_IN
        plt.close(fig)
    assert plots.pca_by_position(pcs).axes[0].get_title() == "layer 3"
    plt.close("all")


def test_legends_lie_off_the_axes(drawn):
    for stem, fig in drawn.items():
        fig.draw_without_rendering()
        for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)]:
            if legend is None:
                continue
            box = legend.get_window_extent()
            assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes if ax.axison), stem


def test_a_legend_on_the_axes_is_caught():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], label="on the data")
    legend = ax.legend(loc="center")
    fig.draw_without_rendering()
    assert legend.get_window_extent().overlaps(ax.get_window_extent())
    plt.close(fig)


def _lines_x(ax) -> np.ndarray:
    from matplotlib.collections import LineCollection

    xs = [line.get_xdata() for line in ax.lines if len(line.get_xdata()) > 1]
    xs += [seg[:, 0] for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    return np.concatenate([np.asarray(x, dtype=float) for x in xs])


def test_no_ablation_bar_reaches_below_the_smallest_run(drawn):
    ax = drawn["ablation_resampled_fraction"].axes[0]
    runs = _drawn_tables().ablation_runs
    lowest = 100 * runs.loc[runs["ablation"] == "resampled_fraction", "value"].min()
    assert lowest == 0.0
    drawn_x = _lines_x(ax)
    assert drawn_x[np.isfinite(drawn_x)].min() >= lowest - 1e-9  # the paper's band is a patch, not a line
    # The old mean ± std of the same runs: 26.7% ± 39.5% reaches -12.8%.
    values = runs.loc[runs["ablation"] == "resampled_fraction"].assign(value=lambda d: 100 * d["value"]).groupby(
        "variant")["value"]
    assert (values.mean() - values.std()).min() < 0


def test_ablation_figures_have_titles_and_a_zero_median_reads_0(drawn):
    for name in figures.ABLATION_AXES:
        assert drawn[f"ablation_{name}"].axes[0].get_title(), name
    texts = [t.get_text() for t in drawn["ablation_resampled_fraction"].axes[0].texts]
    assert "0" in texts and "median" in texts  # every variant's median is 0 (layer 3 of three at 80%)


def test_a_zero_height_bar_is_labelled_0():
    import matplotlib.pyplot as plt

    from posae.report import plots

    norms = _drawn_tables().norms
    raw = pd.DataFrame({"layer": [13, 3, 8], "acc_raw": [0.0, 0.4, 0.35], "chance": 0.125})
    fig = plots.position_structure(norms, raw)
    bars = fig.axes[1]
    labels = [t.get_text() for t in bars.texts]
    assert labels == ["0.40", "0.35", "0"]  # layers 3, 8, 13 in that order; the zero bar says so
    assert [t.get_text() for t in bars.get_xticklabels()] == ["3", "8", "13"]
    heights = [p.get_height() for p in bars.patches]
    assert heights == [0.4, 0.35, 0.0]
    plt.close(fig)


def test_the_probe_stage_owns_the_position_share_histogram_and_the_figures_stage_does_not():
    from posae.checks import load_config
    from posae.pipeline.stages import products, stage_list

    cfg = load_config("smoke")
    owned = {s.name: {p.key for p in products(cfg, s)} for s in stage_list(cfg)}
    assert {"figures/position_share.png", "figures/position_share.pdf"} <= owned["probe"]
    assert not any("position_share" in key for key in owned["figures"])
    assert "figures/mse_ratio.png" in owned["figures"] and "figures/mse_ratio.png" not in owned["probe"]


def test_a_figure_saved_twice_is_the_same_file(tmp_path):
    """A stage that reruns rewrites its products byte for byte, so the stages that read them are not rerun."""
    import matplotlib.pyplot as plt

    from posae.report import plots

    runs = _drawn_tables().ablation_runs
    for stem in ("a", "b"):  # drawn afresh each time, as a rerun notebook does
        fig = plots.ablation(runs, "resampled_fraction", None, "features resampled", True)
        plots.save(fig, tmp_path / stem)
        plt.close(fig)
    for ext in ("png", "pdf"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes(), ext


def test_table1_reads_the_matched_l0_ratio_of_a_study_of_this_config_only(tmp_path, monkeypatch):
    """A study that read this config's stores gives Table 1 its target-L0 rows; one of another config's stores,
    or a study without a target row, gives nothing (the column stays '—')."""
    from posae.report.tables import STUDY_JSON, study_matched

    monkeypatch.setenv("POSAE_FIGURES", str(tmp_path))
    rows = pd.DataFrame({"variant": ["baseline", "hierarchical", "baseline", "hierarchical"],
                         "l0": [20.0, 20.0, 33.4, 33.4], "mse_ratio": [1.0, 0.5, 1.0, 0.93],
                         "target": [False, False, True, True]})
    (tmp_path / "study").mkdir()
    rows.to_csv(tmp_path / "study" / "matched.csv", index=False)
    (tmp_path / "study" / STUDY_JSON).write_text(json.dumps({"stores": "mine", "layer": 1, "target_l0": 33.4}))
    assert study_matched("other").empty
    m = study_matched("mine")
    assert m.to_dict("list") == {"variant": ["baseline", "hierarchical"], "layer": [1, 1], "mse_ratio": [1.0, 0.93]}

    tables = make_tables({"baseline": 0.20, "hierarchical": 0.22})._replace(matched=m)
    table = table1(tables).set_index("variant")
    assert table.at["hierarchical", "mse_ratio_matched_mean"] == pytest.approx(0.93)
    assert math.isnan(table.at["residual", "mse_ratio_matched_mean"])
    by_layer = table1(tables, by_layer=True).set_index(["variant", "layer"])
    assert by_layer.at[("hierarchical", 1), "mse_ratio_matched_mean"] == pytest.approx(0.93)
    assert math.isnan(by_layer.at[("hierarchical", 0), "mse_ratio_matched_mean"])
    assert "| 0.93 |" in table1_markdown(table.reset_index())
    assert math.isnan(table1(make_tables({"baseline": 0.2})).set_index("variant").at["baseline",
                                                                                     "mse_ratio_matched_mean"])

    rows.drop(columns="target").to_csv(tmp_path / "study" / "matched.csv", index=False)  # no target row
    assert study_matched("mine").empty


def test_the_written_out_style_is_what_seaborn_sets():
    """plots.set_style writes seaborn's paper/whitegrid/colorblind theme out (seaborn's import is a second per
    kernel): it must stay what seaborn itself would set, or the figures change without anyone deciding so."""
    import matplotlib as mpl
    import seaborn as sns

    from posae.report import plots

    with mpl.rc_context():
        codes = {c: mpl.colors.to_rgb(c) for c in "bgrmyck"}
        sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
        theirs, their_codes = dict(mpl.rcParams), {c: mpl.colors.to_rgb(c) for c in "bgrmyck"}
        plots.set_style()
        ours, our_codes = dict(mpl.rcParams), {c: mpl.colors.to_rgb(c) for c in "bgrmyck"}
        for c, rgb in codes.items():
            mpl.colors.colorConverter.colors[c] = rgb
    ours_only = {"figure.dpi", "savefig.dpi", "savefig.bbox", "image.cmap"}  # our own choices
    assert {k: (theirs[k], ours[k]) for k in theirs if k not in ours_only and theirs[k] != ours[k]} == {}
    assert our_codes == their_codes
    assert plots.colorblind(12) == list(sns.color_palette("colorblind", 12))


def test_a_notebook_kernel_imports_neither_seaborn_nor_scikit_learn_to_plot_or_train():
    import subprocess
    import sys

    code = ("import sys; from posae.report import plots; from posae.checkpoint import metrics_frame; "
            "from posae.notebook import setup; from posae.train import train_variant; plots.set_style(); "
            "print(sorted(m for m in ('seaborn', 'sklearn', 'scipy.stats') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
