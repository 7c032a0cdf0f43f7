"""Probes: buckets, the split by sequence, stratified subsampling, the unlearning score, and probe_all end to
end on hand-built SAEs over planted and position-free activations."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from posae import checkpoint
from posae.checks import load_config
from posae.config import to_dict
from posae.data.store import write_store
from posae.eval import metrics
from posae.eval.probes import (COLUMNS, permuted_within, positional_feature_counts, probe_all, shuffled_positions,
                               unlearning_score)
from posae.eval.probing import cluster_se, fit_probe, probe_sample, split_by_sequence, stratified_subsample
from posae.paths import activations_dir, run_dir, sae_dir
from posae.saes import build
from posae.saes.buckets import position_bucket


def test_bucket_is_floor_of_t_times_buckets_over_L():
    assert position_bucket(np.array([0, 15, 16, 127]), 128, 8).tolist() == [0, 0, 1, 7]
    with pytest.raises(ValueError):
        position_bucket(np.array([128]), 128, 8)


def test_split_never_puts_one_sequence_on_both_sides():
    seq = np.repeat(np.arange(50), 10)
    split = split_by_sequence(seq, 0.2, seed=3)
    assert not set(seq[split.train_idx]) & set(seq[split.test_idx])
    assert len(set(seq[split.test_idx])) == 10
    again = split_by_sequence(seq, 0.2, seed=3)
    assert (again.test_idx == split.test_idx).all()


def test_stratified_subsample_takes_positions_evenly():
    pos = np.tile(np.arange(1, 17), 100)
    idx = stratified_subsample(np.arange(len(pos)), pos, 320, seed=0)
    assert len(idx) == 320 and (np.bincount(pos[idx])[1:] == 20).all()


def test_unlearning_score_on_hand_computed_accuracies():
    assert unlearning_score(1.0, 0.125, 8) == pytest.approx(1.0)
    assert unlearning_score(0.5625, 0.125, 8) == pytest.approx(0.5)  # (0.5625-0.125)/(1-1/8)
    assert unlearning_score(0.3, 0.6, 8) == 0.0  # clipped


def test_probe_reads_a_planted_position_signal_and_not_noise():
    rng = np.random.default_rng(0)
    pos = np.tile(np.arange(32), 60)
    y = position_bucket(pos, 32, 8)
    signal = np.c_[np.eye(8)[y] * 3, rng.normal(size=(len(pos), 4))] + rng.normal(size=(len(pos), 12)) * 0.5
    noise = rng.normal(size=(len(pos), 12))
    tr, te = np.arange(0, 1500), np.arange(1500, len(pos))
    assert fit_probe(signal[tr], y[tr], signal[te], y[te]).accuracy > 0.9
    assert fit_probe(noise[tr], y[tr], noise[te], y[te]).accuracy < 0.25


# --------------------------------------------------------------------------- probing SAE runs end to end

T, D = 32, 16  # context length; width (global dims 0..7, position dims 8..15)


def make_cfg(name: str):
    base = load_config("smoke", check_model=False)
    return dataclasses.replace(
        base, name=name, capture=dataclasses.replace(base.capture, layers=(0,)),
        corpus=dataclasses.replace(base.corpus, seq_len=T), train=dataclasses.replace(base.train, seeds=(0,)),
        sae=dataclasses.replace(base.sae, buckets=8), probe=dataclasses.replace(base.probe, tokens=2400, eval_sequences=None))


def make_store(cfg, planted: bool, n_seq: int = 120, seed: int = 0):
    """Noise activations; `planted`: dims 8..15 hold the one-hot position bucket (x3), a position code."""
    rng = np.random.default_rng(seed)
    pos = np.tile(np.arange(1, T), n_seq)
    x = rng.normal(size=(len(pos), D)).astype(np.float32)
    if planted:
        x[:, 8:] = 3 * np.eye(8)[position_bucket(pos, T, 8)] + 0.05 * rng.normal(size=(len(pos), 8))
    return write_store(activations_dir(cfg.name, 0, "val"), x, np.zeros(len(pos)), pos,
                       np.repeat(np.arange(n_seq), T - 1), {"seq_len": T, "hash": cfg.name})


def save_identity_run(cfg, store, variant: str = "soft_masking", echo: bool = False):
    """f = ReLU(x) feature by feature (soft mask σ(20) ≈ 1): global features see dims 0..7, position features 8..15.

    `echo`: position feature j instead fires (≈ 5) wherever the *fed* position is in bucket j, whatever x is: its
    mask opens on bucket j only and its bias lifts it above zero, so the group echoes the SAE's position input.
    """
    sae = build(variant, D, cfg.sae, T)
    with torch.no_grad():
        sae.W_enc_DK.copy_(torch.eye(D))
        sae.W_dec_KD.copy_(torch.eye(D))
        sae.b_enc_K.zero_()
        sae.b_dec_D.zero_()
        if variant == "soft_masking":
            sae.mask_logits_TP.fill_(20.0)
        if echo:
            sae.b_enc_K[8:] = 5.0
            sae.mask_logits_TP.copy_(torch.where(torch.from_numpy(np.eye(8)[position_bucket(np.arange(T), T, 8)]) > 0,
                                                 20.0, -20.0))
    info = {"variant": variant, "layer": 0, "seed": 0, "d_model": D, "k": sae.k, "seq_len": T,
            "config": to_dict(cfg), "normalisation": {"scale": store.scale}, "done": True}
    checkpoint.save_run(sae_dir(cfg.name, variant, 0, 0), sae, info, [], torch.from_numpy(np.asarray(store.mean_D)))


def test_probe_sample_keeps_sequences_on_one_side_and_matches_the_raw_probe_draw(runs_root):
    cfg = make_cfg("probe-sample")
    store = make_store(cfg, planted=False)
    sample = probe_sample(store, cfg.probe, 8)
    assert not set(store.seq_N[sample.train_rows]) & set(store.seq_N[sample.test_rows])
    assert len(sample.train_rows) + len(sample.test_rows) <= cfg.probe.tokens
    assert (sample.y_train == position_bucket(store.pos_N[sample.train_rows], T, 8)).all()


def test_planted_position_features_give_a_high_unlearning_score_and_share_near_one(runs_root):
    cfg = make_cfg("probe-planted")
    save_identity_run(cfg, make_store(cfg, planted=True))
    row = probe_all(cfg, progress=False).iloc[0]
    assert row["grouping"] == "learned"
    assert row["acc_position"] > 0.95 and row["acc_global"] < 0.25
    assert row["U"] > 0.5
    features = metrics.evaluate_all(cfg, progress=False).features
    planted = features[features["group"] == "position"]["position_share"]
    assert planted.min() > 0.9
    assert features[features["group"] == "global"]["position_share"].max() < 0.1
    counts = positional_feature_counts(features).set_index("group")
    assert counts.loc["position", "positional"] == 8 and counts.loc["global", "positional"] == 0


def test_no_position_signal_gives_an_unlearning_score_near_zero(runs_root):
    cfg = make_cfg("probe-noise")
    save_identity_run(cfg, make_store(cfg, planted=False))
    row = probe_all(cfg, progress=False).iloc[0]
    assert row["U"] < 0.1
    assert abs(row["acc_position"] - 0.125) < 0.08 and abs(row["acc_global"] - 0.125) < 0.08


def test_an_echo_of_the_fed_position_scores_high_on_U_and_zero_on_U_x(runs_root):
    cfg = make_cfg("probe-echo")
    save_identity_run(cfg, make_store(cfg, planted=False), echo=True)
    row = probe_all(cfg, progress=False).iloc[0]
    assert row["position_input"] == "used"
    assert row["acc_position"] > 0.95 and row["U"] > 0.9  # the old score credits the echo
    assert row["U_x"] < 0.05 and abs(row["acc_position_x"] - 0.125) < 0.06  # the new one does not
    assert abs(row["D_x"] - row["D_x_null"]) < 4 * row["D_x_se"] + 0.02


def test_position_read_from_x_keeps_its_score_with_the_input_neutralised(runs_root):
    cfg = make_cfg("probe-reads-x")
    save_identity_run(cfg, make_store(cfg, planted=True))
    row = probe_all(cfg, progress=False).iloc[0]
    assert row["U"] > 0.5 and row["U_x"] == pytest.approx(row["U"])  # masks all open: the input does nothing
    assert row["position_input"] == "ignored"
    assert abs(row["D_x_null"]) < 0.1 and row["converged"]
    assert row["all_gap"] > -2 * row["all_gap_se"] - 0.01  # all features read at least what the best group does


def test_null_labels_are_permuted_within_each_sequence_and_fed_positions_across_tokens():
    seq = np.repeat(np.arange(20), 10)
    y = np.tile(np.arange(10), 20)
    z = permuted_within(y, seq, seed=0)
    assert not (z == y).all()
    for s_ in range(20):
        assert sorted(z[seq == s_]) == sorted(y[seq == s_])
    fed = shuffled_positions(y, seed=0)
    assert sorted(fed) == sorted(y) and not (fed == y).all()


def test_cluster_se_counts_sequences_not_tokens():
    rng = np.random.default_rng(0)
    iid = rng.normal(size=2000)
    assert cluster_se(iid, np.arange(2000)) == pytest.approx(iid.std(ddof=1) / np.sqrt(2000), rel=0.01)
    shared = np.repeat(rng.normal(size=20), 100)  # 20 sequences of 100 identical tokens: 20 observations
    assert cluster_se(shared, np.repeat(np.arange(20), 100)) == pytest.approx(shared[::100].std(ddof=1) / np.sqrt(20),
                                                                               rel=0.01)
    assert cluster_se(shared, np.arange(2000)) < cluster_se(shared, np.repeat(np.arange(20), 100)) / 5


def test_probes_csv_has_the_columns_marks_arbitrary_halves_and_keeps_other_variants(runs_root):
    cfg = make_cfg("probe-csv")
    store = make_store(cfg, planted=True)
    save_identity_run(cfg, store, "soft_masking")
    save_identity_run(cfg, store, "baseline")
    df = probe_all(cfg, progress=False)
    on_disk = pd.read_csv(run_dir(cfg.name) / "probes.csv")
    assert list(on_disk.columns) == COLUMNS and len(on_disk) == 2
    assert dict(zip(df["variant"], df["grouping"])) == {"baseline": "arbitrary", "soft_masking": "learned"}
    assert (df["chance"] == 0.125).all() and df["acc_raw"].nunique() == 1  # raw probe: once per layer
    assert probe_all(cfg, variants="baseline", progress=False)["variant"].tolist() == ["baseline"]
    assert sorted(pd.read_csv(run_dir(cfg.name) / "probes.csv")["variant"]) == ["baseline", "soft_masking"]
