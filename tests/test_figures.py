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
from posae.report.claims import (CANNOT, DIFFERS, HOLDS, VERDICTS, claims, combine, extremes_verdict, interval_verdict,
                                 u_noise)
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
    for column in ("MSE", "paper MSE", "MSE / baseline", "paper MSE / baseline", "paper U", "acc_raw"):
        assert f"| {column} |" in header


def test_every_claim_has_one_of_the_three_verdicts(smoke_figures):
    df = pd.read_csv(smoke_figures / "claims.csv")
    assert set(df["verdict"]) <= set(VERDICTS)
    assert len(df) == 10 and df["reason"].str.len().min() > 10
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


@pytest.mark.parametrize("mean, std, low, high, expected", [
    (0.72, 0.01, 0.68, 0.78, HOLDS),  # inside
    (0.60, 0.05, 0.68, 0.78, DIFFERS),  # 0.65 reaches no further than 0.65
    (0.64, 0.04, 0.68, 0.78, HOLDS),  # the intervals touch at 0.68
    (0.50, math.nan, 0.09, 0.15, DIFFERS),  # one run: std counts as 0
    (0.12, math.nan, 0.09, 0.15, HOLDS),
    (math.nan, 0.01, 0.09, 0.15, CANNOT),  # nothing measured
    (-0.03, 0.005, -0.02, 0.02, DIFFERS),
])
def test_interval_verdict(mean, std, low, high, expected):
    assert interval_verdict(mean, std, low, high) == expected


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


def test_u_noise_is_two_standard_errors_of_a_difference_of_accuracies():
    assert u_noise(2000, 1 / 8) == pytest.approx(2 * math.sqrt(0.5 / 2000) / (7 / 8))
    assert u_noise(200, 1 / 8) > u_noise(2000, 1 / 8)


def test_paper_ratios_are_those_of_spec_section_9():
    ratios = {v: round(paper_ratio(v)[0], 2) for v in PAPER_TABLE1}
    assert ratios == {"baseline": 1.0, "soft_masking": 1.06, "hierarchical": 1.06, "contrastive": 1.08,
                      "multiscale": 1.1, "position_masking": 1.13, "soft_masking_sparse": 1.1}
    assert paper_ratio("baseline")[1] == 0.0
    assert all(math.isnan(x) for x in paper_ratio("residual"))  # not in the paper


# --------------------------------------------------------------------------- table and claims on hand-made runs


def make_tables(mse: dict[str, float], l1: float = 0.05, U: float = 0.0, share: float = 0.72,
                gate: float | None = 0.5) -> RunTables:
    """Two layers × two seeds per variant; MSE per variant (+1% on layer 1), everything else constant."""
    rows, probes = [], []
    for v, m in mse.items():
        for layer in (0, 1):
            for seed in (0, 1):
                rows.append({"variant": v, "layer": layer, "seed": seed, "grouping": "learned",
                             "val/mse": m * (1.01 if layer else 1.0) + 0.001 * seed, "sparsity/mean_activation": l1,
                             "sparsity/l0": 10.0, "val/explained_variance": 1 - m, "sparsity/dead_fraction": 0.0})
                probes.append({"variant": v, "layer": layer, "seed": seed, "grouping": "learned", "acc_global": 0.5,
                               "acc_position": 0.5, "acc_all": 0.5, "acc_raw": 0.6, "U": U, "chance": 0.125,
                               "train_tokens": 6400, "test_tokens": 1600})
    summary = [{"ablation": "global_magnitude_share", "variant": "hierarchical", "mean": share, "std": 0.01,
                "runs": 4, "start": math.nan},
               {"ablation": "position_weighting", "variant": "position_weighted", "mean": 0.01, "std": 0.005,
                "runs": 4, "start": math.nan}]
    if gate is not None:
        summary.append({"ablation": "gate_activation", "variant": "hierarchical", "mean": gate, "std": 0.001,
                        "runs": 4, "start": 0.5})
    empty = pd.DataFrame()
    return RunTables(pd.DataFrame(rows), empty, pd.DataFrame(probes), pd.DataFrame(summary), empty, empty, empty)


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


def test_a_position_score_beyond_the_probe_noise_differs():
    tables = make_tables({"baseline": 0.2, "hierarchical": 0.21}, U=0.2)
    df = claims(tables)
    assert df.loc[df["claim"].str.startswith("unlearning"), "verdict"].item() == DIFFERS
