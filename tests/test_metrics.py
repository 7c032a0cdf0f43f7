"""Validation metrics: streaming equals one-shot, hand-computable SAEs, position-variance share, the tables on disk."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from posae import checkpoint
from posae.checks import load_config
from posae.config import ConfigError, to_dict
from posae.data.store import write_store
from posae.eval import metrics
from posae.paths import activations_dir, run_dir, sae_dir
from posae.saes import REGISTRY, build

T = 16  # context length of the synthetic stores; positions 1..15 are stored (BOS excluded)


def make_cfg(name: str, d: int = 8, layers=(0,), seeds=(0,)):
    base = load_config("smoke", check_model=False)
    return dataclasses.replace(
        base, name=name, capture=dataclasses.replace(base.capture, layers=layers),
        corpus=dataclasses.replace(base.corpus, seq_len=T), train=dataclasses.replace(base.train, seeds=seeds),
        sae=dataclasses.replace(base.sae, buckets=4), probe=dataclasses.replace(base.probe, eval_sequences=None))


def make_store(cfg, layer: int, n_seq: int, d: int, seed: int = 0, planted: bool = False):
    """Noise activations; `planted`: dimension 0 is a function of the position alone."""
    rng = np.random.default_rng(seed)
    pos = np.tile(np.arange(1, T), n_seq)
    seq = np.repeat(np.arange(n_seq), T - 1)
    x = rng.normal(size=(len(pos), d)).astype(np.float32)
    if planted:
        x[:, 0] = np.cos(pos / T * np.pi) * 3
    return write_store(activations_dir(cfg.name, layer, "val"), x, np.zeros(len(pos)), pos, seq,
                       {"seq_len": T, "hash": f"{cfg.name}-{layer}", "layer": layer, "split": "val"})


def identity_sae(cfg, variant: str, d: int):
    """k = 2d features [ReLU(x), ReLU(−x)] with decoder [I; −I]: x̂ = x exactly."""
    sae = build(variant, d, dataclasses.replace(cfg.sae, expansion=2.0), T)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc_DK.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec_KD.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc_K.zero_()
        sae.b_dec_D.zero_()
    return sae


def save(cfg, sae, store, variant: str, layer: int = 0, seed: int = 0):
    out = sae_dir(cfg.name, variant, layer, seed)
    sae_cfg = {**to_dict(cfg), "sae": {**to_dict(cfg.sae), "expansion": sae.k / sae.d_model}}
    info = {"variant": variant, "layer": layer, "seed": seed, "d_model": sae.d_model, "k": sae.k,
            "seq_len": sae.seq_len, "config": sae_cfg, "normalisation": {"scale": store.scale}, "done": True}
    checkpoint.save_run(out, sae, info, [], torch.from_numpy(np.asarray(store.mean_D)))
    return out


def test_identity_sae_reconstructs_exactly_with_hand_computable_sparsity(runs_root):
    cfg = make_cfg("metrics-identity")
    store = make_store(cfg, 0, 20, 8)
    sae = identity_sae(cfg, "baseline", 8)
    x = store.normalised(np.arange(len(store))).numpy()
    s = metrics.accumulate(sae, store, np.arange(len(store)), chunk=37)
    m = metrics.all_metrics(s)
    assert m["val/mse"] == pytest.approx(0.0, abs=1e-10)
    assert m["val/explained_variance"] == pytest.approx(1.0)
    assert m["sparsity/l0"] == pytest.approx((x != 0).sum(1).mean())  # one of ReLU(x_i), ReLU(−x_i) fires
    assert m["sparsity/l1"] == pytest.approx(np.abs(x).sum(1).mean(), rel=1e-5)
    assert m["sparsity/mean_activation"] == pytest.approx(np.abs(x).sum(1).mean() / 16, rel=1e-5)
    assert m["sparsity/dead_fraction"] == 0.0
    # The arbitrary halves of an undivided dictionary are ReLU(x) and ReLU(−x).
    assert m["global/magnitude_share"] == pytest.approx(np.maximum(x, 0).sum() / np.abs(x).sum(), rel=1e-5)
    assert m["global/mse_without"] == pytest.approx((np.maximum(x, 0) ** 2).mean(), rel=1e-5)
    assert m["global/coverage"] == pytest.approx((x > 0).any(1).mean())  # tokens with any positive coordinate
    assert m["position/coverage"] == pytest.approx((x < 0).any(1).mean())
    assert not s.learned_groups


def test_streaming_in_chunks_equals_one_pass_and_mse_by_position(runs_root):
    cfg = make_cfg("metrics-chunks")
    store = make_store(cfg, 0, 30, 8, seed=1)
    sae = build("hierarchical", 8, cfg.sae, T, seed=3)
    rows = np.arange(len(store))
    a, b = metrics.accumulate(sae, store, rows, chunk=50), metrics.accumulate(sae, store, rows, chunk=10_000)
    for key, value in metrics.all_metrics(a).items():
        assert value == pytest.approx(metrics.all_metrics(b)[key], rel=1e-5, abs=1e-9), key
    x = store.normalised(rows)
    pos = torch.from_numpy(store.pos_N.astype(np.int64))
    with torch.no_grad():
        err = (x - sae(x, pos).x_hat).pow(2).numpy()
    by_pos = metrics.mse_by_position(a)
    assert by_pos["position"].tolist() == list(range(1, T))
    expected = pd.Series(err.mean(1)).groupby(store.pos_N).mean()
    np.testing.assert_allclose(by_pos["mse"], expected.to_numpy(), rtol=1e-4)
    assert metrics.all_metrics(a)["val/mse"] == pytest.approx(err.mean(), rel=1e-5)


def test_position_variance_share_is_one_for_a_positional_feature_and_near_zero_for_noise(runs_root):
    cfg = make_cfg("metrics-share")
    store = make_store(cfg, 0, 400, 4, planted=True)
    sae = identity_sae(cfg, "baseline", 4)
    with torch.no_grad():
        sae.W_enc_DK[:, 3] = 0  # feature 3 = ReLU(−1): never fires
        sae.b_enc_K[3] = -1.0
    s = metrics.accumulate(sae, store, np.arange(len(store)))
    share = metrics.position_variance_share(s)
    assert share[0] == pytest.approx(1.0, abs=1e-4) and share[4] == pytest.approx(1.0, abs=1e-4)
    assert share[[1, 2, 5, 6]].max() < 0.02  # (T − 1)/N ≈ 0.0025 by chance
    assert np.isnan(share[3])
    table = metrics.feature_table(s, buckets=4)
    assert table["bucket_mass_max"].iloc[1] == pytest.approx(0.25, abs=0.05)  # spread evenly
    assert table["bucket_mass_max"].iloc[0] > 0.45  # cos(πt/T) > 0 only in the first half


def test_eval_rows_are_whole_sequences(runs_root):
    cfg = make_cfg("metrics-rows")
    store = make_store(cfg, 0, 40, 4)
    rows = metrics.eval_rows(store, 10, seed=0)
    seqs = np.unique(store.seq_N[rows])
    assert len(seqs) == 10 and len(rows) == 10 * (T - 1)
    assert (metrics.eval_rows(store, None, 0) == np.arange(len(store))).all()


def test_evaluate_all_writes_tables_reuses_fresh_rows_and_recomputes_stale_ones(runs_root, monkeypatch):
    cfg = make_cfg("metrics-all")
    store = make_store(cfg, 0, 12, 8)
    save(cfg, identity_sae(cfg, "baseline", 8), store, "baseline")
    folder = save(cfg, build("soft_masking", 8, cfg.sae, T, seed=1), store, "soft_masking")
    ev = metrics.evaluate_all(cfg, progress=False)
    assert ev.metrics["variant"].tolist() == ["baseline", "soft_masking"]
    assert ev.metrics["grouping"].tolist() == ["arbitrary", "learned"]
    assert len(ev.features) == 16 + 8 and len(ev.by_position) == 2 * (T - 1)
    for name in (metrics.METRICS_CSV, metrics.BY_POSITION_CSV, metrics.FEATURES_CSV):
        assert (run_dir(cfg.name) / name).exists()

    calls = []
    real = metrics.evaluate_run
    monkeypatch.setattr(metrics, "evaluate_run", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = metrics.evaluate_all(cfg, progress=False)
    assert calls == []
    pd.testing.assert_frame_equal(again.metrics, ev.metrics, check_dtype=False)

    sae = checkpoint.load_sae(folder)
    with torch.no_grad():
        sae.b_enc_K.add_(1.0)  # a retrained run: new weights, new key
    save(cfg, sae, store, "soft_masking")
    metrics.evaluate_all(cfg, progress=False)
    assert [p.parts[-3] for p in calls] == ["soft_masking"]


def test_a_run_trained_on_another_capture_is_refused(runs_root):
    cfg = make_cfg("metrics-stale")
    store = make_store(cfg, 0, 10, 4)
    save(cfg, build("baseline", 4, cfg.sae, T), store, "baseline")
    make_store(cfg, 0, 10, 4, seed=5)  # captured again: another mean and scale
    with pytest.raises(metrics.StaleRun, match="captured again.*Fix: retrain"):
        metrics.evaluate_all(cfg, progress=False)


def test_unknown_variant_and_missing_runs_say_what_to_do(runs_root):
    cfg = make_cfg("metrics-missing")
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        metrics.evaluate_all(cfg, variants="nope", progress=False)
    with pytest.raises(FileNotFoundError, match="no finished SAE runs.*Fix: train"):
        metrics.evaluate_all(cfg, progress=False)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_variant_evaluates_and_mse_without_a_group_equals_decoding_it_zeroed(name, runs_root):
    """`accumulate` relies on x̂ being f W_dec plus terms free of f; a variant that breaks this fails here."""
    cfg = make_cfg(f"metrics-variant-{name}")
    store = make_store(cfg, 0, 6, 8, seed=2)
    sae = build(name, 8, cfg.sae, T, seed=1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))  # off the initialisation
    rows = np.arange(len(store))
    m = metrics.all_metrics(metrics.accumulate(sae, store, rows, chunk=32))
    x = store.normalised(rows)
    pos = torch.from_numpy(store.pos_N.astype(np.int64))
    with torch.no_grad():
        f = sae.encode(x, pos)
        assert m["val/mse"] == pytest.approx(float((x - sae.decode(f, pos)).pow(2).mean()), rel=1e-4)
        for group, r in sae.probe_groups().items():
            f0 = f.clone()
            f0[:, r.start:r.stop] = 0
            assert m[f"{group}/mse_without"] == pytest.approx(float((x - sae.decode(f0, pos)).pow(2).mean()), rel=1e-4)
