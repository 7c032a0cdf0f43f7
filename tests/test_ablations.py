"""The ablations of paper §6.3, each on hand-built SAEs with a known answer, and end to end on runs trained here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from posae import checkpoint
from posae.checks import load_config
from posae.config import to_dict
from posae.data.store import write_store
from posae.eval import ablations
from posae.paths import activations_dir, run_dir, sae_dir
from posae.saes import build

T, D = 16, 8


def make_cfg(name: str, **train):
    base = load_config("smoke", check_model=False)
    return dataclasses.replace(
        base, name=name, capture=dataclasses.replace(base.capture, layers=(0,)),
        corpus=dataclasses.replace(base.corpus, seq_len=T),
        train=dataclasses.replace(base.train, **{"seeds": (0,), **train}),
        probe=dataclasses.replace(base.probe, eval_sequences=None))


def make_stores(cfg, n_seq: int = 24):
    """Training and validation stores of noise; validation normalised with the training statistics."""
    rng = np.random.default_rng(0)
    pos = np.tile(np.arange(1, T), n_seq)
    seq = np.repeat(np.arange(n_seq), T - 1)
    meta = {"seq_len": T, "hash": cfg.name}
    train = write_store(activations_dir(cfg.name, 0, "train"), rng.normal(size=(len(pos), D)), np.zeros(len(pos)),
                        pos, seq, {**meta, "split": "train"})
    val = write_store(activations_dir(cfg.name, 0, "val"), rng.normal(size=(len(pos), D)), np.zeros(len(pos)),
                      pos, seq, {**meta, "split": "val"}, stats_from=train)
    return train, val


def save(cfg, sae, store, variant: str, seed: int = 0, **info):
    base = {"variant": variant, "layer": 0, "seed": seed, "d_model": sae.d_model, "k": sae.k, "seq_len": sae.seq_len,
            "config": to_dict(cfg), "normalisation": {"scale": store.scale}, "done": True,
            "diagnostics_start": build(variant, D, cfg.sae, T, seed=seed).diagnostics()}
    checkpoint.save_run(sae_dir(cfg.name, variant, 0, seed), sae, {**base, **info}, [],
                        torch.from_numpy(np.asarray(store.mean_D)))


def test_global_features_carrying_three_times_the_position_features_have_share_three_quarters(runs_root):
    cfg = make_cfg("ablation-share")
    _, val = make_stores(cfg)
    sae = build("soft_masking", D, cfg.sae, T)
    with torch.no_grad():
        # Global feature j = 3·ReLU(x_j), position feature j = ReLU(x_j) (mask σ(30) = 1): share 3/4 exactly.
        sae.W_enc_DK.zero_()
        for j in range(D // 2):
            sae.W_enc_DK[j, j], sae.W_enc_DK[j, D // 2 + j] = 3.0, 1.0
        sae.b_enc_K.zero_()
        sae.b_dec_D.zero_()
        sae.mask_logits_TP.fill_(30.0)
    save(cfg, sae, val, "soft_masking")
    result = ablations.run_ablations(cfg, progress=False)
    share = result.runs.query("ablation == 'global_magnitude_share'")["value"]
    assert share.tolist() == [pytest.approx(0.75, abs=1e-6)]


def test_gate_activation_reads_the_learned_gate_and_its_start(runs_root):
    cfg = make_cfg("ablation-gate")
    _, val = make_stores(cfg)
    sae = build("hierarchical", D, cfg.sae, T)
    with torch.no_grad():
        sae.gate_logits_TP.fill_(-2.0)
    save(cfg, sae, val, "hierarchical")
    save(cfg, build("baseline", D, cfg.sae, T), val, "baseline")  # no gate: no row
    result = ablations.run_ablations(cfg, progress=False)
    gate = result.summary.query("ablation == 'gate_activation'")
    assert gate["variant"].tolist() == ["hierarchical"]
    assert gate["mean"].iloc[0] == pytest.approx(1 / (1 + np.exp(2.0)))  # σ(−2) ≈ 0.119, the paper's value
    assert gate["start"].iloc[0] == pytest.approx(0.5)  # σ(0): the initialisation (docs/decisions.md §9)
    assert gate["paper"].iloc[0] == "0.12 ± 0.03"


def test_position_weighting_is_the_paired_relative_mse_change():
    metrics = pd.DataFrame({
        "variant": ["baseline", "baseline", "position_weighted", "position_weighted", "position_weighted"],
        "layer": [3, 8, 3, 8, 13], "seed": [0, 0, 0, 0, 0], "val/mse": [1.0, 2.0, 1.02, 1.96, 5.0]})
    pairs = ablations.position_weighting(metrics)
    assert pairs["layer"].tolist() == [3, 8]  # layer 13 has no baseline to pair with
    np.testing.assert_allclose(pairs["value"], [0.02, -0.02])
    summary = ablations.summarise(pairs.assign(ablation="position_weighting"))
    assert summary["mean"].iloc[0] == pytest.approx(0.0, abs=1e-12)
    assert summary["std"].iloc[0] == pytest.approx(np.std([0.02, -0.02], ddof=1))


def test_resampled_fraction_is_what_the_run_recorded():
    infos = [{"variant": "baseline", "layer": 3, "seed": s, "resampled_fraction": f} for s, f in ((0, 0.06), (1, 0.10))]
    out = ablations.summarise(ablations.resampled_fraction(infos).assign(ablation="resampled_fraction"))
    assert out["mean"].iloc[0] == pytest.approx(0.08) and out["paper"].iloc[0] == "8% ± 2%"
    assert ablations.display_table(out)["ours"].iloc[0] == "8.0% ± 2.8%"


@pytest.mark.slow
def test_end_to_end_on_runs_trained_with_the_training_api(runs_root):
    from posae.saes import variant_config
    from posae.train import train_run

    # resample_after 0.1 of 20 steps: features silent for 2 steps are revived, so some are.
    cfg = make_cfg("ablation-trained", steps=20, batch_size=120, resample_after=0.1, log_every=5, checkpoint_every=20)
    train, _ = make_stores(cfg)
    for variant in ("baseline", "position_weighted", "hierarchical"):
        train_run(variant_config(cfg, variant), variant, 0, 0, train, progress=False)
    result = ablations.run_ablations(cfg, progress=False)
    summary = result.summary.set_index(["ablation", "variant"])
    assert set(summary.index) >= {("global_magnitude_share", "hierarchical"), ("gate_activation", "hierarchical"),
                                  ("position_weighting", "position_weighted"), ("resampled_fraction", "baseline")}
    recorded = checkpoint.read_metrics(sae_dir(cfg.name, "baseline", 0, 0))[-1]["metrics/resampled_fraction"]
    assert summary.loc[("resampled_fraction", "baseline"), "mean"] == pytest.approx(recorded)
    weighting = result.runs.query("ablation == 'position_weighting'")
    ev = result.evaluation.metrics.set_index("variant")["val/mse"]
    assert weighting["value"].iloc[0] == pytest.approx(ev["position_weighted"] / ev["baseline"] - 1)
    on_disk = pd.read_csv(run_dir(cfg.name) / ablations.ABLATIONS_CSV)
    assert {"ablation", "variant", "mean", "std", "runs", "paper_mean", "paper_std", "paper"} <= set(on_disk.columns)
    assert (run_dir(cfg.name) / ablations.ABLATIONS_RUNS_CSV).exists()
