"""The planted ground truth (notebook 00): its controls come out as they must, and its data and products
are what it says. Trained on the smoke config's width (d = 64, 4 buckets) with 256 validation sequences,
so that the probes' held-out tokens (~1,600) make the noise bounds tight; the references and the raw
probe are also checked at the default width."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml

from posae import checkpoint
from posae.checks import load_config
from posae.eval import ground_truth as gt
from posae.paths import PARAMS_DIR
from posae.pipeline.stages import products, stage_list
from posae.saes import REGISTRY


def smoke_gt_config():
    cfg = load_config("smoke")
    return dataclasses.replace(cfg, name="smoke_gt", corpus=dataclasses.replace(cfg.corpus, n_val=256))


@pytest.fixture(scope="module")
def cfg(runs_root):
    return smoke_gt_config()


@pytest.fixture(scope="module")
def results(cfg):
    return gt.ground_truth(cfg)


def row(df, data, sae):
    return df[(df["data"] == data) & (df["variant"] == sae)].iloc[0]


def test_every_variant_and_both_references_are_scored_on_both_data_sets(results):
    assert sorted(results["variant"].unique()) == sorted([*REGISTRY, "echo", "oracle"])
    assert results.groupby("data").size().to_dict() == {"control": len(REGISTRY) + 2, "planted": len(REGISTRY) + 2}
    assert results["test_tokens"].min() > 1000


def test_echo_control_is_credited_by_the_old_score_and_not_by_the_new(results):
    for data in gt.DATASETS:
        echo = row(results, data, "echo")
        assert echo["acc_position"] == 1.0 and echo["U"] >= 0.5, (data, echo["U"])
        assert echo["U_x"] <= 0.05, (data, echo["U_x"])


def test_oracle_reads_the_planted_code_out_of_x(results):
    oracle = row(results, "planted", "oracle")
    assert oracle["acc_position"] >= 0.95 and oracle["acc_position_x"] >= 0.95
    assert oracle["U"] >= 0.9 and oracle["U_x"] >= 0.9
    assert oracle["position_input"] == "ignored"


def test_raw_probe_reads_the_planted_bucket_and_not_the_control(results):
    chance = 1 / 4
    assert row(results, "planted", "baseline")["acc_raw"] >= 0.95
    control = row(results, "control", "baseline")
    assert abs(control["acc_raw"] - chance) <= 3 * np.sqrt(chance * (1 - chance) / control["test_tokens"])


def test_on_the_control_data_no_sae_is_credited_beyond_its_null(results):
    control = results[results["data"] == "control"]
    bound = gt.null_bound(4, int(control["test_tokens"].min()))
    assert 0.05 < bound < 0.1  # three standard deviations at ~1,600 held-out tokens and chance 1/4
    gap = control["D_x"] - control["D_x_null"]
    assert gap.abs().max() <= bound, control.assign(gap=gap)[["variant", "D_x", "D_x_null", "gap"]]
    # The null's own spread over the SAEs is what the bound assumes: sd √2·√(c(1 − c)/n)/(1 − c).
    assert control["D_x_null"].std() <= 2 * bound / 3 / np.sqrt(2)


def test_controls_table_says_every_control_holds(results):
    table = gt.controls(results)
    assert len(table) == 8 and table["holds"].all(), table


def test_trained_runs_report_recovery_ev_and_l0_and_references_do_not(results):
    trained, refs = results[results["kind"] == "trained"], results[results["kind"] == "reference"]
    columns = ["recovery_global", "recovery_position", "recovery_code", "explained_variance", "l0"]
    assert trained[columns].notna().all().all() and refs[columns].isna().all().all()
    assert trained["explained_variance"].between(0, 1).all() and (trained["l0"] > 0).all()


def test_recovery_is_one_for_the_planted_dictionary_and_low_for_a_random_one(cfg):
    p = gt.planted(gt.design(cfg))
    W_KD = torch.from_numpy(np.concatenate([p.global_GD, p.position_PD, p.code_CD]))
    for dirs_MD in (p.global_GD, p.position_PD, p.code_CD):
        assert gt.recovery(W_KD, dirs_MD) == pytest.approx(1.0, abs=1e-5)
        assert gt.recovery(-2 * W_KD.flip(0), dirs_MD) == pytest.approx(1.0, abs=1e-5)  # sign, norm and order
    random_KD = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    assert gt.recovery(random_KD, p.global_GD) < 0.6  # the best of 64 random cosines at d = 64: ~0.4


def test_generator_is_deterministic_and_the_data_sets_differ(cfg):
    ds = gt.design(cfg)
    for data in gt.DATASETS:
        first, again = list(gt.generate(ds, data, "train")), list(gt.generate(ds, data, "train"))
        assert len(first) == len(again)
        for a, b in zip(first, again):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    planted, control = next(gt.generate(ds, "planted", "val")), next(gt.generate(ds, "control", "val"))
    assert not np.array_equal(planted[0], control[0])
    other = next(gt.generate(dataclasses.replace(ds, seed=1), "planted", "val"))
    assert not np.array_equal(planted[0], other[0])


def test_stores_are_written_once_and_reused(cfg, results):
    ds = gt.design(cfg)
    path = gt.store_path(cfg, "planted", "train")
    before = (path / "meta.json").stat().st_mtime_ns
    stores = gt.write_stores(cfg, ds, "planted")
    assert (path / "meta.json").stat().st_mtime_ns == before
    assert stores["val"].scale == stores["train"].scale  # validation normalised with the training statistics


def test_products_land_under_runs_config_ground_truth(cfg, results, runs_root):
    root = runs_root / cfg.name / "ground_truth"
    stage = next(s for s in stage_list(cfg) if s.name == "ground_truth")
    owned = products(cfg, stage)
    assert len(owned) == 1 + 2 * len(REGISTRY)
    for p in owned:
        assert p.path.exists() and root in p.path.parents, p.path
    assert (root / gt.GROUND_TRUTH_CSV).exists()
    for folder in gt.run_folders(cfg):
        assert checkpoint.check_run(folder)["done"]
    assert not (runs_root / cfg.name / "saes").exists() and not (runs_root / cfg.name / "activations").exists()


def test_a_second_call_trains_nothing(cfg, results):
    folders = gt.run_folders(cfg)
    before = [(f / checkpoint.INFO).stat().st_mtime_ns for f in folders]
    stores = {data: gt.write_stores(cfg, gt.design(cfg), data) for data in gt.DATASETS}
    gt.train_all(cfg, stores)
    assert [(f / checkpoint.INFO).stat().st_mtime_ns for f in folders] == before


@pytest.mark.slow
def test_references_and_raw_probe_at_the_default_width(runs_root):
    """No training: the controls that need none, at d = 640, L = 128, 8 buckets (a few training sequences
    for the normalisation, the probes' full sample for validation)."""
    cfg = dataclasses.replace(load_config("default", check_model=False), name="default_gt")
    ds = dataclasses.replace(gt.design(cfg), train_sequences=16)
    stores = {data: gt.write_stores(cfg, ds, data) for data in gt.DATASETS}
    df = gt.evaluate(cfg, ds, stores, {})
    planted, control = (df[df["data"] == data].set_index("variant") for data in ("planted", "control"))
    assert planted.loc["echo", "U"] >= 0.5 and planted.loc["echo", "U_x"] <= 0.05
    assert planted.loc["oracle", "acc_position"] >= 0.95 and planted.loc["oracle", "U_x"] >= 0.9
    assert planted["acc_raw"].iloc[0] >= 0.95
    assert abs(control["acc_raw"].iloc[0] - 1 / 8) <= 3 * np.sqrt(1 / 8 * 7 / 8 / control["test_tokens"].iloc[0])
    bound = gt.null_bound(8, int(control["test_tokens"].min()))
    assert (control["D_x"] - control["D_x_null"]).abs().max() <= bound


@pytest.mark.slow
def test_the_stage_is_skipped_when_done_and_reruns_when_a_product_is_deleted(tmp_path, runs_root):
    from posae.pipeline.driver import reproduce

    path = tmp_path / "smoke_gt_stage.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text()), "name": "smoke_gt_stage"}))

    def run() -> dict[str, str]:
        return {r["stage"]: r["status"] for r in reproduce(str(path), only=("ground_truth",), log=lambda line: None)}

    assert run() == {"ground_truth": "ran"}
    assert run() == {"ground_truth": "skipped"}
    cfg = load_config(str(path))
    infos = [(f / checkpoint.INFO).stat().st_mtime_ns for f in gt.run_folders(cfg)]
    (gt.ground_truth_dir(cfg) / gt.GROUND_TRUTH_CSV).unlink()
    assert run() == {"ground_truth": "ran"}
    assert [(f / checkpoint.INFO).stat().st_mtime_ns for f in gt.run_folders(cfg)] == infos  # rescored, not retrained
