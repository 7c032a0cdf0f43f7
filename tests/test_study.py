"""The robustness study (posae.study, notebook 08): the grid is what docs/study.md says, a small grid runs end to end
on the smoke config and resumes without retraining, the matched-L0 reading is an interpolation in log L0 that
never extrapolates, and λ2 is selected on the selection half of the validation sequences only."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from posae import study as st
from posae.config import ConfigError, read_config
from posae.paths import REPO_ROOT, figures_dir, sae_dir
from posae.report.claims import CANNOT, VERDICTS
from posae.train import lr_at, lr_budget

# --------------------------------------------------------------------------- the grid (no training)


@pytest.fixture(scope="module")
def study_cfg():
    return read_config("study")


def test_the_study_config_is_the_default_one_and_reads_its_stores(study_cfg):
    default = read_config("default")
    assert study_cfg.bases == (str(REPO_ROOT / "params" / "default.yaml"),)
    assert study_cfg.train == default.train and study_cfg.sae == default.sae and study_cfg.probe == default.probe
    assert study_cfg.stores_name == "default"  # no second capture


def test_the_default_grid_has_the_documented_points_and_distinct_runs(study_cfg):
    points = st.grid_points(study_cfg)
    assert Counter(p.part for p in points) == {"budget": 6 * 3 * 2, "sparsity": 11 * 5, "contrastive": 5 * 3 * 2 + 3 * 2,
                                               "gate_init": 3 * (2 + 1)}
    assert {p.layer for p in points if p.part != "contrastive"} == {8}
    assert {p.layer for p in points if p.part == "contrastive"} == {3, 8, 13}
    # Shared with the study config itself: the sparsity part's λ1 x 1 (seed 0, five budget variants: soft_masking's
    # is train.l1 = 0.1 / 0.4 there), the contrastive part's λ2 = 0.3 and baselines on layer 8 (2 + 2), the 0.5 gate
    # start (1x two seeds, 16x one).
    assert len(st.distinct_runs(study_cfg, points)) == 136 - 5 - 4 - 3 == 124
    names = {st.run_of(study_cfg, p).config for p in points}
    l1s = ("0.03", "0.05", "0.15", "0.22", "0.075", "0.125", "0.25", "0.375", "0.55", "0.015", "0.025", "0.11")
    assert names == {"study", "study+train.steps=1200", "study+train.steps=4800",
                     *(f"study+train.l1={v}" for v in l1s),
                     *(f"study+sae.options.contrastive.weight={v}" for v in ("0", "0.1", "1", "3")),
                     *(f"study+sae.options.hierarchical.gate_init={v}{s}" for v in ("-1.9924", "1.9924")
                       for s in ("", "+train.steps=4800"))}
    for p in points:  # every point reads the default run's stores
        assert st.point_config(study_cfg, p).stores_name == "default"


def test_a_point_trains_what_it_names(study_cfg):
    from posae.saes import variant_config

    points = st.grid_points(study_cfg)
    long = st.point_config(study_cfg, next(p for p in points if p.part == "budget" and p.factor == 16))
    assert long.train.steps == 4800
    # The schedule's fractions stretch with the run: warm-up 5% (240 steps), decay the last 30%, the budget 16x.
    assert lr_at(238, long.train) < long.train.lr == lr_at(240, long.train) and lr_at(4799, long.train) < 1e-5
    assert lr_budget(long.train) == pytest.approx(16 * lr_budget(study_cfg.train), rel=5e-3)  # up to the ramps' steps
    gates = {p.gate_init for p in points if p.part == "gate_init"}
    assert sorted(1 / (1 + math.exp(-g)) for g in gates) == pytest.approx([0.12, 0.5, 0.88], abs=1e-4)
    for p in points:
        v = variant_config(st.point_config(study_cfg, p), p.variant)
        assert v.train.l1 == p.l1 and v.train.steps == p.factor * 300
        if p.part == "sparsity":  # every variant sweeps the same λ1 x l1_scale
            assert v.train.l1 * v.train.l1_scale in [pytest.approx(m * 0.1) for m in st.Grid().l1_factors]
        if p.variant == "contrastive":
            assert v.sae.options["weight"] == p.weight
        if p.variant == "hierarchical":
            assert v.sae.options["gate_init"] == p.gate_init


def test_the_estimated_cost_fits_the_cap(study_cfg):
    cost = st.cost(study_cfg, st.grid_points(study_cfg)).set_index("part")
    assert cost.loc["total", "runs"] == 124
    assert cost.loc["total", "wall_min"] < 45  # `make study` after `make reproduce` (docs/study.md)


def test_a_layer_that_is_not_captured_is_one_error_naming_it(study_cfg):
    with pytest.raises(ConfigError, match=r"the study's layer 9 is not captured .*Fix: use one of \[3, 8, 13\]"):
        st.grid_points(study_cfg, st.Grid(layer=9))


def test_the_command_line_refuses_an_unknown_config_in_one_line(capsys):
    assert st.main(["--config", "no_such_config", "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no_such_config" in err[0]


def test_make_study_is_its_own_command_and_reproduce_does_not_run_it(study_cfg):
    from posae.pipeline.stages import stage_list

    assert st.NOTEBOOK not in {s.notebook for s in stage_list(read_config("default"))}
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "\nstudy: setup\n" in makefile and "posae.study" in makefile.split("\nstudy: setup\n")[1].split("\n\n")[0]
    assert "study" not in makefile.split("\nreproduce: setup\n")[1].split("\n\n")[0]


# --------------------------------------------------------------------------- the pure pieces


def test_at_l0_interpolates_in_log_l0_and_never_extrapolates():
    l0, y = np.array([100.0, 10.0, 1000.0]), np.array([1.0, 0.0, 3.0])  # unsorted on purpose
    assert st.at_l0(l0, y, 10.0) == 0.0 and st.at_l0(l0, y, 100.0) == 1.0
    assert st.at_l0(l0, y, math.sqrt(10 * 100)) == pytest.approx(0.5)  # half way in log L0, not at L0 = 55
    assert st.at_l0(l0, y, 10 ** 2.5) == pytest.approx(2.0)
    for outside in (9.99, 1000.01, 0.0, math.nan):
        assert math.isnan(st.at_l0(l0, y, outside))
    assert math.isnan(st.at_l0([10.0], [1.0], 10.0))  # one point is no frontier
    assert st.at_l0([10.0, math.nan, 100.0], [0.0, 5.0, 1.0], math.sqrt(1000)) == pytest.approx(0.5)


def test_matched_mse_ratio_against_a_hand_made_frontier():
    # The baseline's MSE falls from 0.4 at L0 10 to 0.1 at L0 1000; the variant's is 1.2x it, measured on 20..200.
    l0b, l0v = np.array([10.0, 100.0, 1000.0]), np.array([20.0, 200.0])
    base = lambda l0: 0.4 - 0.1 * np.log10(l0 / 10) * 1.5  # noqa: E731  (linear in log L0, exact under interpolation)
    front = pd.DataFrame({"variant": ["baseline"] * 3 + ["v"] * 2, "l1": [0.3, 0.1, 0.03, 0.2, 0.05],
                          "sparsity/l0": np.r_[l0b, l0v], "val/mse": np.r_[base(l0b), 1.2 * base(l0v)]})
    m = st.matched(front, [15.0, 50.0, 150.0, 500.0]).set_index(["variant", "l0"])["mse_ratio"]
    assert m[("v", 50.0)] == pytest.approx(1.2) and m[("v", 150.0)] == pytest.approx(1.2)
    assert math.isnan(m[("v", 15.0)]) and math.isnan(m[("v", 500.0)])  # beyond the variant's measured range
    assert m[("baseline", 500.0)] == 1.0


def test_the_validation_halves_are_disjoint_whole_and_cut_by_id():
    seq_N = np.repeat(np.array([7, 3, 11, 5, 2, 9, 4]), 3)
    h = st.halves(seq_N)
    assert set(h["select"]) | set(h["report"]) == set(seq_N) and not set(h["select"]) & set(h["report"])
    assert h["select"].max() < h["report"].min() and abs(len(h["select"]) - len(h["report"])) <= 1


def _scores(select: dict[float, float], report: dict[float, float], cost: dict[float, float] | None = None):
    rows = []
    for half, excess in (("select", select), ("report", report)):
        for lam, e in excess.items():
            for layer in (3, 8):
                rows.append({"half": half, "layer": layer, "seed": 0, "lambda2": lam, "excess": e,
                             "mse_ratio": (cost or {}).get(lam, 1.0) if half == "select" else 1.0,
                             "dead_fraction": 0.0})
    return pd.DataFrame(rows)


def test_lambda2_is_selected_on_the_selection_half_only():
    # Planted: the halves disagree. The selection half prefers 1, the report half 3 (by far).
    planted = _scores({0.0: 0.0, 1.0: 0.2, 3.0: 0.1}, {0.0: 0.0, 1.0: 0.1, 3.0: 0.9})
    assert st.select_lambda2(planted, 1.08, 0.05) == 1.0
    swapped = planted.assign(half=planted["half"].map({"select": "report", "report": "select"}))
    assert st.select_lambda2(swapped, 1.08, 0.05) == 3.0  # the same rows, the other half: the choice follows it
    # A λ2 that costs too much MSE (on the selection half) is not eligible, however high its score.
    costly = _scores({0.0: 0.0, 1.0: 0.2, 3.0: 0.5}, {0.0: 0.0, 1.0: 0.1, 3.0: 0.9}, cost={3.0: 1.5})
    assert st.select_lambda2(costly, 1.08, 0.05) == 1.0
    assert math.isnan(st.select_lambda2(costly.assign(dead_fraction=0.5), 1.08, 0.05))


# --------------------------------------------------------------------------- a small study on the smoke config


TINY = st.Grid(budget_variants=("baseline", "hierarchical"), factors=(1, 2), l1_factors=(0.5, 1.0, 2.0),
               sparsity_variants=("baseline", "hierarchical"), lambda2s=(0.0, 0.3), gate_factors=(1, 2),
               gate_seeds=(1, 1), max_mse_ratio=10.0, max_dead=1.0)


@pytest.fixture(scope="module")
def smoke_study(smoke_capture):
    from posae.checks import load_config

    cfg = load_config("smoke")
    return cfg, st.run_study(cfg, TINY, jobs=1, reference=False)


def _files(cfg, points) -> dict[Path, int]:
    """Every run's config.json and the study's cached evaluations, with their modification times."""
    found = {}
    for p in points:
        r = st.run_of(cfg, p)
        found[sae_dir(r.config, p.variant, p.layer, p.seed) / "config.json"] = 0
    found.update({f: 0 for f in (Path(os.environ["POSAE_RUNS"]) / cfg.name / "study").rglob("*.json")})
    return {f: f.stat().st_mtime_ns for f in found}


def test_a_small_study_runs_end_to_end(smoke_study):
    cfg, s = smoke_study
    assert len(s.df) == len(s.points) == len(st.grid_points(cfg, TINY))
    assert set(s.budget["factor"]) == {1, 2} and set(s.budget.loc[s.budget["runs"] > 0, "variant"]) == {
        "baseline", "hierarchical"}
    assert (s.budget.loc[s.budget["runs"] > 0, "runs"] == 2).all()
    assert len(s.frontier) == 2 * 3 and s.frontier["fidelity/ce_score"].notna().all()
    # The steps the runs made are the ones their points name.
    steps = s.df.groupby("factor")["budget"].first()
    assert steps[2] == pytest.approx(lr_budget(read_config("smoke", ["train.steps=40"]).train))
    assert list(s.verdicts.columns) == ["claim", "1x training", "2x training", f"matched L0 = {s.target_l0:.0f}"]
    assert set(s.verdicts.drop(columns="claim").to_numpy().ravel()) <= set(VERDICTS)
    matched = s.verdict_columns[f"matched L0 = {s.target_l0:.0f}"].set_index("claim")
    assert matched.loc["unlearning score U = 0.0 for every variant", "verdict"] == CANNOT  # one seed: not tested
    assert set(s.contrastive["half"]) == {"select", "report"} and set(s.contrastive["lambda2"]) == {0.0, 0.3}
    assert s.lambda2 in (0.0, 0.3)
    assert set(s.gate["factor"]) == {1, 2} and s.gate["start"].tolist() == pytest.approx([0.12, 0.5, 0.88] * 2,
                                                                                         abs=1e-4)


def test_a_rerun_retrains_and_reevaluates_nothing_and_a_lost_run_only_itself(smoke_study):
    cfg, s = smoke_study
    before = _files(cfg, s.points)
    again = st.run_study(cfg, TINY, jobs=1, reference=False)
    assert _files(cfg, s.points) == before
    pd.testing.assert_frame_equal(again.df, s.df)
    # A killed study that lost one run (here: deleted) trains that run alone again.
    lost = next(p for p in s.points if p.part == "sparsity" and p.l1 != cfg.train.l1)
    folder = sae_dir(st.run_of(cfg, lost).config, lost.variant, lost.layer, lost.seed)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    st.run_study(cfg, TINY, jobs=1, reference=False)
    changed = {f for f, t in _files(cfg, s.points).items() if before.get(f) != t}
    assert folder / "config.json" in changed
    assert {f.parent for f in changed} <= {folder, st.cache_path(cfg, st.run_of(cfg, lost), "x").parent}


def test_the_outputs_are_written_and_figures_fit_the_page(smoke_study, tmp_path):
    from PIL import Image

    from posae.report.plots import set_style

    set_style()
    _, s = smoke_study
    written = st.write_outputs(s, tmp_path)
    assert all(p.exists() for p in written) and (tmp_path / "verdicts.md").exists()
    for name in st.FIGURES:
        im = Image.open(tmp_path / f"{name}.png")
        assert im.size[0] / im.info["dpi"][0] <= 7.0 + 1e-6, name
    text = (tmp_path / "verdicts.md").read_text()
    assert all(v in text for v in s.verdicts["1x training"])


def test_the_heartbeat_counts_what_is_on_disk(smoke_study):
    """Planted: every run of the finished small study is trained and evaluated; a run whose config.json says
    it is not done is not counted as trained (and the study's own outputs name its base's stores)."""
    cfg, s = smoke_study
    trained, evaluated, n = st.progress_counts(cfg, TINY)
    assert trained == evaluated == n == len(st.distinct_runs(cfg, s.points))
    r = next(iter(st.distinct_runs(cfg, s.points)))
    info_path = sae_dir(r.config, r.variant, r.layer, r.seed) / "config.json"
    original = info_path.read_text()
    try:
        info_path.write_text(json.dumps({**json.loads(original), "done": False}))
        assert st.progress_counts(cfg, TINY)[0] == n - 1
    finally:
        info_path.write_text(original)


def test_the_outputs_name_the_stores_the_study_read(smoke_study, tmp_path):
    from posae.report.tables import STUDY_JSON

    cfg, s = smoke_study
    st.write_outputs(s, tmp_path)
    info = json.loads((tmp_path / STUDY_JSON).read_text())
    assert info["stores"] == cfg.stores_name and info["layer"] == st.study_layer(cfg, TINY)
    m = pd.read_csv(tmp_path / "matched.csv")
    assert m.loc[m["target"], "l0"].unique().tolist() == [round(s.target_l0, 1)]


def test_make_study_runs_notebook_08_and_publishes_its_render(smoke_capture, tmp_path, capsys):
    # A study config derived from smoke, as params/study.yaml is from default: it reads smoke's stores.
    (tmp_path / "smoke_study.yaml").write_text("base: smoke\n")
    config = str(tmp_path / "smoke_study.yaml")
    assert read_config(config).stores_name == "smoke"
    assert st.main(["--config", config, "--sample", "--jobs", "2"]) == 0  # what `make study` runs, on the sample
    said = capsys.readouterr().out
    assert said.startswith("study: running notebook 08 on ") and "study: " in said.splitlines()[-1]
    out = figures_dir("smoke_study")
    assert (out / "notebooks" / "08_study.html").exists()
    assert {"verdicts.md", "verdicts.csv", "frontier.png", "budget.csv", "matched.csv"} <= {p.name for p in out.iterdir()}
    assert not (Path(os.environ["POSAE_RUNS"]) / "smoke_study" / "activations").exists()  # no second capture
