"""Downstream fidelity: the spliced pass against the model's own forward on every architecture, planted
replacements with a known score (the original activation, zero, noise), the per-token losses against a direct
computation, BOS left alone, and fidelity_all end to end on smoke stores with hand-built SAEs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from posae import checkpoint
from posae.checks import load_config
from posae.config import RANDOM_ARCHITECTURES, ModelConfig, RandomModelConfig, to_dict
from posae.data import models
from posae.data.capture import capture, decoder_layers
from posae.data.store import StoreError, open_layer_stores
from posae.eval import fidelity as fid
from posae.eval.metrics import StaleRun
from posae.paths import run_dir, sae_dir
from posae.saes import build
from posae.saes.buckets import position_bucket

pytestmark = pytest.mark.usefixtures("one_thread")


def random_loaded(architecture: str = "gemma3_text", sharpen: float = 1.0, **hf: object) -> models.Loaded:
    """A tiny random model; `hf` overrides fields of its transformers config (Gemma 3: layer types, window).

    `sharpen` multiplies the unembedding: the random model's logits are within ±1, where soft-capping them at 30
    (Gemma 2) changes nothing measurable; x50 they reach ±30.
    """
    r = RandomModelConfig(architecture=architecture, num_kv_heads=4, head_dim=16)
    loaded = models.load_model(ModelConfig(name="random", dtype="float32", device="cpu", random=r))
    if hf:
        config = models.random_hf_config(r, len(loaded.tokenizer), loaded.tokenizer)
        for key, value in hf.items():
            setattr(config, key, value)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = type(loaded.model)(config).eval().requires_grad_(False)
        loaded = loaded._replace(model=model)
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(sharpen)
    return loaded


def replacing_hook(replace, first: int = 1):
    """A forward hook that makes a block output `replace(x, pos)` at positions first.. (the slow reference)."""

    def hook(module, args, output):
        h_BLD = output[0] if isinstance(output, tuple) else output
        B, L, D = h_BLD.shape
        new = h_BLD.clone()
        x = h_BLD[:, first:].reshape(-1, D).float()
        new[:, first:] = replace(x, torch.arange(first, L).repeat(B)).reshape(B, L - first, D).to(h_BLD.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def noise(scale: float, seed: int = 0):
    """x plus Gaussian noise of `scale` times x's spread: the same noise for the same input."""
    return lambda x, pos: x + scale * x.std() * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the spliced pass is the model's


def reference_logits(loaded, ids_BL, layer, replace):
    blocks = decoder_layers(loaded.model)
    handle = blocks[layer].register_forward_hook(replacing_hook(replace))
    try:
        with torch.inference_mode():
            return loaded.model(input_ids=ids_BL, attention_mask=torch.ones_like(ids_BL), use_cache=False).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("architecture", RANDOM_ARCHITECTURES)
def test_running_the_blocks_above_a_layer_equals_the_full_forward_with_a_replacing_hook(architecture):
    loaded = random_loaded(architecture, sharpen=50.0)
    check_run_from(loaded, layers=(0, 3))  # the first block and the last, above which only the final norm runs


def test_local_and_global_blocks_each_get_their_own_mask_and_rotary_embedding():
    # Gemma 3 as in the 270M: sliding-window blocks (rope base 10k) between global ones (1M); a window of 4 < 12 tokens.
    loaded = random_loaded("gemma3_text", layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=4,
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})
    check_run_from(loaded, layers=(0, 1))
    # The blocks above layer 0 called with block 1's arguments throughout would be wrong, and measurably so.
    ids_BL = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    tail = fid.model_tail(loaded.model)
    cp = fid.clean_pass(loaded.model, ids_BL, [0], tail)
    wrong = {i: cp.calls[1] for i in cp.calls}
    assert not torch.allclose(fid.run_from(tail, 0, cp.hidden[0], wrong), cp.final_BLD, atol=1e-4)


def check_run_from(loaded, layers):
    ids_BL = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    tail = fid.model_tail(loaded.model)
    cp = fid.clean_pass(loaded.model, ids_BL, layers, tail)
    pos_L = torch.arange(12)
    for layer in layers:
        for replace in (noise(0.5), fid.zero):
            ours = fid.logits(tail, fid.run_from(tail, layer, fid.splice(cp.hidden[layer], replace, pos_L), cp.calls))
            ref = reference_logits(loaded, ids_BL, layer, replace)
            torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)
            assert not torch.allclose(ours, fid.logits(tail, cp.final_BLD), atol=1e-2)  # the replacement mattered


def test_clean_pass_stops_before_the_unembedding_and_its_final_state_is_the_models():
    loaded = random_loaded()
    tail = fid.model_tail(loaded.model)
    calls = []
    handle = tail.head.register_forward_hook(lambda m, a, o: calls.append(1))
    ids_BL = torch.randint(3, 200, (2, 10))
    try:
        cp = fid.clean_pass(loaded.model, ids_BL, [1], tail)
    finally:
        handle.remove()
    assert calls == []
    with torch.inference_mode():
        full = loaded.model(input_ids=ids_BL, attention_mask=torch.ones_like(ids_BL), use_cache=False).logits
    torch.testing.assert_close(fid.logits(tail, cp.final_BLD), full)
    assert torch.equal(fid.run_from(tail, 1, cp.hidden[1], cp.calls), cp.final_BLD)


def test_a_tail_that_does_not_reproduce_the_logits_is_refused():
    loaded = random_loaded()
    head = loaded.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: output * 2)  # a scaling the tail does not know
    try:
        with pytest.raises(RuntimeError, match="logits .* away from the model's own: posae cannot run the blocks"):
            fid.model_tail(loaded.model)
    finally:
        handle.remove()


# --------------------------------------------------------------------------- planted replacements


@pytest.fixture(scope="module")
def sharp():
    """A random model made confident (final norm x10) and tokens it predicts greedily: replacing a layer's output
    can only cost it, so the zero ablation, noise and the original activation have a known order."""
    loaded = random_loaded()
    tail = fid.model_tail(loaded.model)
    with torch.no_grad():
        tail.norm.weight.fill_(9.0)  # Gemma's RMSNorm scales by (1 + weight)
    ids = torch.randint(3, 259, (6, 1), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ids = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=19, do_sample=False,
                                    pad_token_id=0)
    return loaded, ids


def score_and_kl(tl: fid.TokenLosses, key) -> tuple[float, float]:
    c, z, s = tl.ce_clean_N.mean(), tl.ce["zero"].mean(), tl.ce[key].mean()
    return fid.ce_score(c, z, s), float(tl.kl[key].mean())


def test_the_original_activation_scores_one_zero_scores_zero_and_noise_in_between(sharp):
    loaded, ids = sharp
    replacements = {"original": lambda x, pos: x, "zero": fid.zero, "small noise": noise(0.3), "big noise": noise(1.5)}
    tl = fid.measure(loaded, ids, 1, replacements, batch_size=4)  # two batches
    assert np.array_equal(tl.ce["original"], tl.ce_clean_N)
    assert score_and_kl(tl, "original") == (1.0, 0.0)
    assert score_and_kl(tl, "zero")[0] == 0.0
    assert tl.ce["zero"].mean() > tl.ce_clean_N.mean() + 1.0  # a large gap: the scores below mean something
    (small, kl_small), (big, kl_big) = score_and_kl(tl, "small noise"), score_and_kl(tl, "big noise")
    assert 0.0 < big < small < 1.0
    assert 0.0 < kl_small < kl_big < score_and_kl(tl, "zero")[1]


def test_measured_losses_are_those_of_the_full_forward_with_a_replacing_hook(sharp):
    loaded, ids = sharp
    tl = fid.measure(loaded, ids, 1, {"noise": noise(0.5)}, batch_size=6)
    with torch.inference_mode():
        clean = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    ref = reference_logits(loaded, ids, 1, noise(0.5))
    # Predictions at positions 1..L-2 of the tokens at 2..L-1, sequence by sequence.
    logp, logq = (torch.log_softmax(z[:, 1:-1].double(), -1).flatten(0, 1) for z in (clean, ref))
    targets = ids[:, 2:].reshape(-1, 1)
    np.testing.assert_allclose(tl.ce_clean_N, -logp.gather(1, targets)[:, 0], atol=1e-4)
    np.testing.assert_allclose(tl.ce["noise"], -logq.gather(1, targets)[:, 0], atol=1e-4)
    np.testing.assert_allclose(tl.kl["noise"], (logp.exp() * (logp - logq)).sum(-1), atol=1e-4)
    assert tl.pos_N.tolist() == list(range(1, ids.shape[1] - 1)) * len(ids)


def test_bos_keeps_its_activation_and_the_replacement_never_sees_it(sharp):
    loaded, ids = sharp
    seen = []

    def replace(x, pos):
        seen.append(pos)
        return torch.zeros_like(x)

    hidden = torch.randn(3, 7, 4)
    out = fid.splice(hidden, replace, torch.arange(7))
    assert torch.equal(out[:, 0], hidden[:, 0]) and (out[:, 1:] == 0).all()
    assert seen[0].tolist() == list(range(1, 7)) * 3
    fid.measure(loaded, ids, 1, {"zero": replace}, batch_size=6)
    assert all((p > 0).all() for p in seen[1:]) and sum(len(p) for p in seen[1:]) == ids.numel() - len(ids)


def test_two_single_threaded_workers_give_the_losses_of_one_thread(sharp):
    loaded, ids = sharp
    replacements = {"zero": fid.zero, "noise": noise(0.5)}
    one = fid.measure(loaded, ids, 2, replacements, batch_size=6)
    torch.set_num_threads(2)  # the one_thread fixture restores the count after the test
    two = fid.measure(loaded, ids, 2, replacements, batch_size=6)
    assert torch.get_num_threads() == 2
    np.testing.assert_allclose(two.ce_clean_N, one.ce_clean_N, rtol=1e-5)
    for key in replacements:
        np.testing.assert_allclose(two.ce[key], one.ce[key], rtol=1e-5)
        np.testing.assert_allclose(two.kl[key], one.kl[key], rtol=1e-4, atol=1e-6)


def test_per_token_losses_match_a_direct_log_softmax_with_and_without_soft_capping(sharp):
    loaded, _ = sharp
    tail = fid.model_tail(loaded.model)
    gen = torch.Generator().manual_seed(0)
    clean = 30 * torch.randn(45, 64, generator=gen)  # the random model's unembedding is small: sharpen its logits
    finals = [clean.clone(), clean + 10 * torch.randn(45, 64, generator=gen), 30 * torch.randn(45, 64, generator=gen)]
    targets = torch.randint(0, tail.head.out_features, (45,), generator=gen)
    for t in (tail, tail._replace(softcap=3.0)):
        ce_clean, ce, kl = fid.token_losses(t, clean, finals, targets, chunk=7, vocab_block=50)  # neither divides
        logp = torch.log_softmax(fid.logits(t, clean).double(), -1)
        torch.testing.assert_close(ce_clean.double(), -logp.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=0)
        for r, final in enumerate(finals):
            logq = torch.log_softmax(fid.logits(t, final).double(), -1)
            torch.testing.assert_close(ce[r].double(), -logq.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=0)
            torch.testing.assert_close(kl[r].double(), (logp.exp() * (logp - logq)).sum(-1), atol=1e-5, rtol=0)
        assert (kl[0] == 0).all() and (kl[1:] > 1e-3).all()


def test_ce_score_by_hand():
    assert fid.ce_score(2.0, 6.0, 3.0) == pytest.approx(0.75)
    assert fid.ce_score(2.0, 6.0, 2.0) == 1.0 and fid.ce_score(2.0, 6.0, 6.0) == 0.0


# --------------------------------------------------------------------------- smoke stores and runs


@pytest.fixture(scope="module")
def smoke(runs_root):
    """The smoke config under its own name (its stores captured here), with k = 2d so that an SAE can be exact."""
    base = load_config("smoke")
    cfg = dataclasses.replace(base, name="fidelity-smoke", sae=dataclasses.replace(base.sae, expansion=2.0),
                              train=dataclasses.replace(base.train, seeds=(0,)),
                              probe=dataclasses.replace(base.probe, fidelity_sequences=6))
    capture(cfg, progress=False)
    return cfg


def save_run(cfg, sae, variant: str, layer: int, scale: float | None = None) -> None:
    store = open_layer_stores(cfg, "val", [layer])[layer]
    info = {"variant": variant, "layer": layer, "seed": 0, "d_model": sae.d_model, "k": sae.k, "seq_len": sae.seq_len,
            "config": to_dict(cfg), "normalisation": {"scale": store.scale if scale is None else scale}, "done": True}
    checkpoint.save_run(sae_dir(cfg.name, variant, layer, 0), sae, info, [], torch.from_numpy(np.asarray(store.mean_D)))


def identity_sae(cfg):
    """f = ReLU([x, −x]), x̂ = f [I; −I] = x: a baseline SAE that reconstructs exactly."""
    sae = build("baseline", 64, cfg.sae, cfg.corpus.seq_len)
    eye = torch.eye(64)
    with torch.no_grad():
        sae.W_enc_DK.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec_KD.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc_K.zero_()
        sae.b_dec_D.zero_()
    return sae


@pytest.fixture(scope="module")
def smoke_runs(smoke):
    for layer in smoke.capture.layers:
        save_run(smoke, identity_sae(smoke), "baseline", layer)
        save_run(smoke, build("position_masking", 64, smoke.sae, smoke.corpus.seq_len, seed=layer), "position_masking",
                 layer)
    return fid.fidelity_all(smoke, progress=False)


def test_rebuilt_token_ids_reproduce_the_stored_activations(smoke):
    loaded = models.load_model(smoke.model)
    tail = fid.model_tail(loaded.model)
    stores = open_layer_stores(smoke, "val")
    seqs = fid.fidelity_sequences(stores[1], 6, smoke.probe.seed)
    ids_SL, rows_SP = fid.token_ids(stores[1], seqs, loaded.tokenizer.bos_token_id)
    assert (ids_SL[:, 0] == loaded.tokenizer.bos_token_id).all() and rows_SP.shape == (6, smoke.corpus.seq_len - 1)
    cp = fid.clean_pass(loaded.model, ids_SL, smoke.capture.layers, tail)
    for layer, store in stores.items():
        stored = store.raw(rows_SP.reshape(-1)).reshape(6, -1, 64)
        torch.testing.assert_close(cp.hidden[layer][:, 1:], stored, atol=2e-3, rtol=1e-3)  # float16 storage
        fid.check_against_store(store, cp.hidden[layer], rows_SP)
    shifted = fid.clean_pass(loaded.model, ids_SL.roll(1, dims=1), [1], tail)  # other tokens: not the capture's
    with pytest.raises(StoreError, match="differs from the stored activations .* Fix: run"):
        fid.check_against_store(stores[1], shifted.hidden[1], rows_SP)


def test_sequences_are_drawn_whole_with_the_seed(smoke):
    store = open_layer_stores(smoke, "val", [1])[1]
    a, b = fid.fidelity_sequences(store, 5, 0), fid.fidelity_sequences(store, 5, 1)
    assert len(a) == 5 and np.array_equal(a, fid.fidelity_sequences(store, 5, 0)) and not np.array_equal(a, b)
    assert np.array_equal(fid.fidelity_sequences(store, 10_000, 0), np.unique(store.seq_N))


def test_denormalise_inverts_the_stores_normalisation(smoke):
    store = open_layer_stores(smoke, "val", [2])[2]
    raw = store.raw(np.arange(50))
    torch.testing.assert_close(fid.denormalise(store, store.normalise(raw)), raw, atol=1e-5, rtol=1e-5)


def test_an_exact_sae_scores_one_and_tables_have_their_columns(smoke, smoke_runs):
    runs, by_position = smoke_runs
    assert list(runs.columns) == fid.COLUMNS and list(by_position.columns) == fid.BY_POSITION_COLUMNS
    for name, cols in ((fid.FIDELITY_CSV, fid.COLUMNS), (fid.FIDELITY_BY_POSITION_CSV, fid.BY_POSITION_COLUMNS)):
        on_disk = pd.read_csv(run_dir(smoke.name) / name)
        assert list(on_disk.columns) == cols
    pd.testing.assert_frame_equal(pd.read_csv(run_dir(smoke.name) / fid.FIDELITY_CSV), runs, check_dtype=False)
    assert runs[["variant", "layer"]].values.tolist() == [["baseline", 1], ["baseline", 2], ["position_masking", 1],
                                                          ["position_masking", 2]]
    exact = runs[runs.variant == "baseline"]
    assert np.allclose(exact.ce_score, 1.0, atol=1e-3) and (exact.kl_spliced.abs() < 1e-5).all()
    assert np.allclose(exact.ce_spliced, exact.ce_clean, atol=1e-5)
    assert (runs.kl_zero > 1e-3).all() and (runs.ce_zero != runs.ce_clean).all()
    L = smoke.corpus.seq_len
    assert (runs.tokens == 6 * (L - 2)).all() and (runs.sequences == 6).all()  # predictions at 1..L-2
    untrained = runs[runs.variant == "position_masking"]
    assert (untrained.kl_spliced > 1e-3).all()


def test_bucket_rows_average_to_the_pooled_row(smoke, smoke_runs):
    runs, by_position = smoke_runs
    L = smoke.corpus.seq_len
    assert sorted(by_position.bucket.unique()) == list(range(smoke.sae.buckets))
    for _, row in runs.iterrows():
        b = by_position[(by_position.variant == row.variant) & (by_position.layer == row.layer)]
        assert b.tokens.sum() == row.tokens
        predicting = position_bucket(np.arange(1, L - 1), L, smoke.sae.buckets)  # positions 1..L-2, 6 sequences
        assert b.tokens.tolist() == (6 * np.bincount(predicting)).tolist()
        for col in ("ce_clean", "ce_zero", "ce_spliced", "kl_spliced", "kl_zero"):
            assert np.average(b[col], weights=b.tokens) == pytest.approx(row[col], rel=1e-5, abs=1e-7)
        assert np.allclose(b.ce_score, (b.ce_zero - b.ce_spliced) / (b.ce_zero - b.ce_clean))


def test_a_subset_of_variants_keeps_the_others_rows_and_a_failed_write_leaves_the_old_tables(smoke, smoke_runs,
                                                                                           monkeypatch):
    folder = run_dir(smoke.name)
    before = {name: (folder / name).read_bytes() for name in (fid.FIDELITY_CSV, fid.FIDELITY_BY_POSITION_CSV)}
    sub = fid.fidelity_all(smoke, variants="position_masking", progress=False)
    assert set(sub.runs.variant) == {"position_masking"}
    merged = pd.read_csv(folder / fid.FIDELITY_CSV)
    pd.testing.assert_frame_equal(merged, smoke_runs.runs, check_dtype=False)  # same rows, baseline's kept
    assert (folder / fid.FIDELITY_CSV).read_bytes() == before[fid.FIDELITY_CSV]

    real_to_csv = pd.DataFrame.to_csv

    def torn(df, path, *args, **kwargs):
        real_to_csv(df.head(1), path, *args, **kwargs)  # half a table on disk, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", torn)
    with pytest.raises(OSError):
        fid.fidelity_all(smoke, progress=False)
    monkeypatch.undo()
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_run_normalised_otherwise_than_the_store_is_a_stale_run(smoke, runs_root, monkeypatch):
    cfg = dataclasses.replace(smoke, name="fidelity-stale")
    capture(cfg, progress=False)
    store = open_layer_stores(cfg, "val", [1])[1]
    save_run(cfg, identity_sae(cfg), "baseline", 1, scale=2 * store.scale)
    save_run(cfg, identity_sae(cfg), "baseline", 2)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the runs were checked")

    monkeypatch.setattr(models, "load_model", no_model)
    with pytest.raises(StaleRun) as err:
        fid.fidelity_all(cfg, progress=False)
    message = str(err.value)
    assert "\n" not in message and "layer_1" in message and "Fix: retrain" in message
    assert not (run_dir(cfg.name) / fid.FIDELITY_CSV).exists()
