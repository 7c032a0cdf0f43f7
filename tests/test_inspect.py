"""The feature-inspection workbench (posae.inspect, notebook 07): features_of against the captured store, planted
maxima, correlations and gates found where they were put, the pass over the store against a naive one, escaped
HTML, and galleries that pick the same features every time."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from posae import checkpoint
from posae import inspect as ins
from posae.checks import load_config
from posae.config import to_dict
from posae.data.capture import capture
from posae.data.store import open_layer_stores, write_store
from posae.eval.metrics import accumulate, position_variance_share
from posae.paths import activations_dir, run_dir, sae_dir
from posae.saes import build

pytestmark = pytest.mark.usefixtures("one_thread")


def save_run(cfg, sae, variant: str, layer: int, seed: int = 0, done: bool = True) -> None:
    store = open_layer_stores(cfg, "val", [layer])[layer]
    info = {"variant": variant, "layer": layer, "seed": seed, "d_model": sae.d_model, "k": sae.k,
            "seq_len": sae.seq_len, "config": to_dict(cfg), "normalisation": {"scale": store.scale}, "done": done,
            "step": 1}
    mean_D = torch.from_numpy(np.asarray(store.mean_D))
    checkpoint.save_run(sae_dir(cfg.name, variant, layer, seed), sae, info, [], mean_D)


# --------------------------------------------------------------------------- the smoke model: features_of


@pytest.fixture(scope="module")
def smoke(runs_root):
    """The smoke config under its own name, its stores captured, a hierarchical and a baseline run at layer 2
    (random weights: what is tested is the path from text to features, not what the features mean)."""
    base = load_config("smoke")
    cfg = dataclasses.replace(base, name="inspect-smoke", train=dataclasses.replace(base.train, seeds=(0,)))
    capture(cfg, progress=False)
    for variant in ("hierarchical", "baseline"):
        sae = build(variant, 64, cfg.sae, cfg.corpus.seq_len, seed=3)
        if variant == "hierarchical":
            with torch.no_grad():  # gates away from their uniform start, so the position fed matters
                sae.gate_logits_TP.copy_(torch.randn(sae.gate_logits_TP.shape,
                                                     generator=torch.Generator().manual_seed(1)))
        save_run(cfg, sae, variant, 2)
    return cfg


def sequence_text(run, seq: int) -> tuple[str, np.ndarray]:
    """The text of validation sequence `seq` and its store rows (positions 1..L-1)."""
    rows = np.flatnonzero(np.asarray(run.store.seq_N) == seq)
    text = ins.tokenizer_of(run.cfg.model).decode(np.asarray(run.store.tokens_N)[rows].tolist())
    return text, rows


@pytest.mark.parametrize("variant", ["hierarchical", "baseline"])
def test_features_of_a_stored_text_equal_encoding_its_stored_rows(smoke, variant):
    run = ins.open_run(smoke, variant, 2)
    text, rows = sequence_text(run, seq=5)
    got = ins.features_of(text, run, active_only=False)
    K = run.sae.k
    assert len(got) == len(rows) * K
    per_token = got.drop_duplicates("position")
    np.testing.assert_array_equal(per_token["position"], np.asarray(run.store.pos_N)[rows])  # 1..L-1: BOS excluded
    np.testing.assert_array_equal(per_token["token_id"], np.asarray(run.store.tokens_N)[rows])
    assert per_token["token"].tolist() == ins.token_strings(run, np.asarray(run.store.tokens_N)[rows])
    f_PK = got.pivot(index="position", columns="feature", values="activation").to_numpy()
    pos = torch.from_numpy(np.asarray(run.store.pos_N)[rows].astype(np.int64))
    with torch.inference_mode():
        want_PK = run.sae.encode(run.store.normalised(rows), pos).numpy()
    tol = 1e-2 * float(np.abs(want_PK).max())  # the store holds float16; the model ran on another batch size
    np.testing.assert_allclose(f_PK, want_PK, atol=tol)
    # Planted negatives: another sequence's rows are far from these features, and so, for the variant with a
    # position input, are these rows fed their positions rotated by one.
    other = np.flatnonzero(np.asarray(run.store.seq_N) == 6)
    with torch.inference_mode():
        assert np.abs(f_PK - run.sae.encode(run.store.normalised(other), pos).numpy()).max() > 10 * tol
        if variant == "hierarchical":
            assert np.abs(f_PK - run.sae.encode(run.store.normalised(rows), pos.roll(1)).numpy()).max() > 10 * tol
    active = ins.features_of(text, run)
    assert (active["activation"] > 0).all() and len(active) == int((f_PK > 0).sum())


def test_features_of_refuses_a_text_longer_than_the_context_and_an_empty_one(smoke):
    run = ins.open_run(smoke, "baseline", 2)
    with pytest.raises(ins.InspectError, match=r"40 tokens.*positions up to 31.*Fix: shorten it to at most 31"):
        ins.features_of("x" * 40, run)  # the byte-level tokenizer: one token per character
    assert len(ins.features_of("x" * 31, run, active_only=False)) == 31 * run.sae.k
    with pytest.raises(ins.InspectError, match="holds no tokens.*Fix"):
        ins.features_of("  ", run)


def test_the_model_loads_once_for_every_run_of_a_config(smoke):
    runs = ins.open_runs(smoke, "hierarchical,baseline", layer=2)
    assert ins.model_of(runs[0]) is ins.model_of(runs[1])


def test_a_run_that_is_not_there_or_unfinished_is_named_with_the_fix(smoke):
    with pytest.raises(FileNotFoundError, match=r"seed_7: no trained run here.*Fix"):
        ins.open_run(smoke, "baseline", 2, seed=7)
    with pytest.raises(Exception, match="unknown variant 'basline'"):
        ins.open_run(smoke, "basline", 2)
    save_run(smoke, build("baseline", 64, smoke.sae, smoke.corpus.seq_len), "baseline", 1, done=False)
    with pytest.raises(ins.InspectError, match="not finished.*Fix"):
        ins.open_run(smoke, "baseline", 1)


def test_the_gate_profile_is_the_variants_gate_for_position_features_only(smoke):
    hier, base = ins.open_run(smoke, "hierarchical", 2), ins.open_run(smoke, "baseline", 2)
    P0 = hier.sae.groups["position"].start
    want = torch.sigmoid(hier.sae.gate_logits_TP[:, 5]).detach().numpy()
    np.testing.assert_allclose(ins.gate_profile(hier, P0 + 5), want, rtol=1e-6)
    assert not np.allclose(ins.gate_profile(hier, P0 + 6), want)  # each feature its own column
    assert ins.gate_profile(hier, 0) is None and ins.gate_profile(base, 40) is None
    profile = ins.position_profile(hier, P0 + 5)
    np.testing.assert_allclose(profile["gate"], want[profile["position"]], rtol=1e-6)
    assert profile["gate"].notna().all() and ins.position_profile(base, 40)["gate"].isna().all()
    with pytest.raises(ins.InspectError, match=r"feature 64: not a feature.*0\.\.63"):
        ins.gate_profile(hier, 64)


# --------------------------------------------------------------------------- a planted store: maxima, correlations


T, D = 16, 16  # context length, width: feature j of the planted SAE is ReLU of dimension j (k = d)
SPIKE = (7, 9)  # (sequence, position) of the planted maximum of feature 3
EDGE = (2, 1)  # feature 6's maximum, at the first stored position of its sequence
N_SEQ = 24


@pytest.fixture(scope="module")
def planted(runs_root):
    """Noise activations with planted structure; a baseline SAE reading each dimension as its own feature.

    Feature 3 peaks once, at SPIKE; feature 6 at EDGE; feature 4 is the position plus a constant (through a bias
    that keeps it above 0: correlation and position share 1); feature 9 never fires (bias −100).
    """
    base = load_config("smoke", check_model=False)
    cfg = dataclasses.replace(base, name="inspect-planted", capture=dataclasses.replace(base.capture, layers=(0,)),
                              corpus=dataclasses.replace(base.corpus, seq_len=T),
                              train=dataclasses.replace(base.train, seeds=(0,)))
    rng = np.random.default_rng(0)
    pos = np.tile(np.arange(1, T), N_SEQ)
    seq = np.repeat(np.arange(N_SEQ), T - 1)
    x = rng.normal(size=(len(pos), D)).astype(np.float32)
    x[:, 4] = pos
    x[(seq == SPIKE[0]) & (pos == SPIKE[1]), 3] = 30.0
    x[(seq == EDGE[0]) & (pos == EDGE[1]), 6] = 30.0
    tokens = 3 + rng.integers(0, 200, size=len(pos))
    write_store(activations_dir(cfg.name, 0, "val"), x, tokens, pos, seq, {"seq_len": T, "hash": cfg.name})
    sae = build("baseline", D, cfg.sae, T)
    with torch.no_grad():
        sae.W_enc_DK.copy_(torch.eye(D))
        sae.W_dec_KD.copy_(torch.eye(D))
        sae.b_enc_K.zero_()
        sae.b_enc_K[4], sae.b_enc_K[9] = 50.0, -100.0
        sae.b_dec_D.zero_()
    save_run(cfg, sae, "baseline", 0)
    return cfg


def naive_features(run) -> np.ndarray:
    with torch.inference_mode():
        return run.sae.encode(run.store.normalised(np.arange(len(run.store))),
                              torch.from_numpy(np.asarray(run.store.pos_N).astype(np.int64))).numpy()


def test_top_contexts_find_a_planted_maximum_with_its_window(planted):
    run = ins.open_run(planted, "baseline", 0)
    f_NK = naive_features(run)
    seq_N, pos_N = np.asarray(run.store.seq_N), np.asarray(run.store.pos_N)
    spike = int(np.flatnonzero((seq_N == SPIKE[0]) & (pos_N == SPIKE[1]))[0])
    ctx = ins.top_contexts(run, 3, k=4, window=2)
    first = ctx[ctx["rank"] == 1]
    assert first["row"].tolist() == list(range(spike - 2, spike + 3))
    assert first["position"].tolist() == list(range(SPIKE[1] - 2, SPIKE[1] + 3)) and (first["seq"] == SPIKE[0]).all()
    assert first.loc[first["is_max"], "row"].tolist() == [spike] and first["is_max"].sum() == 1
    np.testing.assert_allclose(first["activation"], f_NK[spike - 2:spike + 3, 3], rtol=1e-6)
    # Ranks 2..4 are the next largest activations, in order (the naive sort, ties to the earlier row).
    maxima = ctx.loc[ctx["is_max"], "row"].tolist()
    assert maxima == np.argsort(-f_NK[:, 3], kind="stable")[:4].tolist()
    assert ctx["token"].tolist() == ins.token_strings(run, np.asarray(run.store.tokens_N)[ctx["row"]])
    # Planted negative: in feature 5 (noise, no spike) the spike's row is not the maximum.
    assert ins.top_contexts(run, 5, k=1, window=0)["row"].tolist() != [spike]


def test_a_window_stops_at_its_sequence_and_a_dead_feature_has_no_context(planted):
    run = ins.open_run(planted, "baseline", 0)
    ctx = ins.top_contexts(run, 6, k=1, window=3)
    assert (ctx["seq"] == EDGE[0]).all() and ctx["offset"].tolist() == [0, 1, 2, 3]
    assert ctx["position"].tolist() == [1, 2, 3, 4]
    assert ins.top_contexts(run, 9).empty
    assert "no token" in ins.contexts_html(ins.top_contexts(run, 9))
    more = ins.top_contexts(run, 3, k=ins.TOP_KEPT + 4, window=0)  # beyond what the pass keeps: a pass of its own
    assert more["rank"].max() == ins.TOP_KEPT + 4
    assert more["row"].tolist() == np.argsort(-naive_features(run)[:, 3], kind="stable")[:ins.TOP_KEPT + 4].tolist()


def test_the_pass_over_the_store_matches_a_naive_one(planted):
    run = ins.open_run(planted, "baseline", 0)
    f_NK, pos_N = naive_features(run), np.asarray(run.store.pos_N)
    # The reshape path (chunks of whole sequences: 37 rounds down to 30, two sequences) and the index_add path
    # (the same store with its rows reversed: positions no longer in order), both against the naive sums.
    reversed_store = copy.copy(run.store)
    for name in ("acts_ND", "tokens_N", "pos_N", "seq_N"):
        setattr(reversed_store, name, getattr(run.store, name)[::-1])
    for store, f_RK, p_R in ((run.store, f_NK, pos_N), (reversed_store, f_NK[::-1], pos_N[::-1])):
        st = ins.run_stats(run.sae, store, top=5, chunk=37)  # several chunks: merges of the top-5 are exercised
        np.testing.assert_allclose(st.top_val_RK, -np.sort(-f_RK, axis=0)[:5], rtol=1e-6)
        np.testing.assert_array_equal(st.count_T, np.bincount(p_R, minlength=T))
        for t in (1, 8, 15):
            np.testing.assert_allclose(st.sum_TK[t], f_RK[p_R == t].sum(0), rtol=1e-5)
            np.testing.assert_array_equal(st.fired_TK[t], (f_RK[p_R == t] > 0).sum(0))
        assert st.sum_TK[0].sum() == 0 and st.count_T[0] == 0
    nonzero = f_NK[:, 3][f_NK[:, 3] > 0]
    want, _ = np.histogram(np.clip(nonzero, ins.HIST_EDGES[0], ins.HIST_EDGES[-1] * 0.999), ins.HIST_EDGES)
    h = ins.histogram(run, 3)
    assert h["tokens"].iloc[0] == int((f_NK[:, 3] == 0).sum()) and h["tokens"].iloc[1:].tolist() == want.tolist()
    # The position share is notebook 04's (feature_stats.csv) definition, on the same tokens (its sums are
    # float32 within a chunk, ours float64: 3e-5 apart on feature 4, whose values are ~50).
    np.testing.assert_allclose(ins.feature_table(run)["position_share"],
                               position_variance_share(accumulate(run.sae, run.store, np.arange(len(run.store)))),
                               atol=1e-4)


def test_a_feature_that_is_the_position_tops_the_correlations_and_the_heatmap(planted):
    run = ins.open_run(planted, "baseline", 0)
    table = ins.feature_table(run)
    assert table.loc[4, "position_corr"] == pytest.approx(1.0, abs=1e-4)
    assert table.loc[4, "position_share"] == pytest.approx(1.0, abs=1e-4)
    assert table.loc[4, "peak_position"] == T - 1
    noise = table.drop(index=[3, 4, 6, 9])
    assert noise["position_corr"].abs().max() < 0.2 and noise["position_share"].max() < 0.2
    assert np.isnan(table.loc[9, "position_corr"]) and np.isnan(table.loc[9, "position_share"])
    top = ins.position_correlated(run, 3)
    assert top["feature"].iloc[0] == 4 and top["group"].iloc[0] == "all"  # an undivided dictionary: one group
    hm = ins.position_heatmap(run, 3)
    assert hm.index[0] == 4 and list(hm.columns) == list(range(1, T))
    profile = ins.position_profile(run, 4)
    np.testing.assert_allclose(hm.loc[4].to_numpy(), profile["mean"] / profile["mean"].max(), rtol=1e-9)
    assert hm.loc[4].idxmax() == T - 1 and 9 not in hm.index
    assert profile["firing_rate"].eq(1.0).all() and profile["mean"].is_monotonic_increasing


# --------------------------------------------------------------------------- HTML


def test_contexts_html_escapes_token_text_and_shades_by_activation():
    frame = pd.DataFrame({"rank": [1, 1, 1], "row": [0, 1, 2], "seq": [0, 0, 0], "position": [4, 5, 6],
                          "offset": [-1, 0, 1], "token_id": [7, 8, 9],
                          "token": ["hello", "<script>alert('x')</script>", "a\nb & c"],
                          "activation": [0.5, 2.0, 0.0], "is_max": [False, True, False]})
    out = ins.contexts_html(frame)
    assert "<script>" not in out and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in out
    assert "a↵b &amp; c" in out and "\n" not in out.split("│")[-1]  # a newline token does not break the line
    assert ">hello</span>" in out  # planted negative: plain text is shown as it is
    assert "rgba(230, 90, 20, 1.00)" in out and "rgba(230, 90, 20, 0.25)" in out and "rgba(230, 90, 20, 0.00)" in out
    assert out.count("font-weight:bold") == 1


def test_gallery_html_shows_each_pick_with_its_contexts(planted):
    run = ins.open_run(planted, "baseline", 0)
    picks = ins.gallery(run, size=2)
    out = ins.gallery_html(run, picks, contexts=2, window=1)
    assert out.count("<b>feature ") == len(picks) == 6
    assert out.count("#1 pos") == 6 and out.count("#2 pos") == 6


# --------------------------------------------------------------------------- galleries


def test_gallery_picks_are_deterministic_and_follow_their_rules(smoke):
    run = ins.open_run(smoke, "hierarchical", 2)
    picks = ins.gallery(run)
    again = ins.gallery(ins.open_run(smoke, "hierarchical", 2))  # a fresh run object: a fresh pass
    pd.testing.assert_frame_equal(picks, again)
    assert set(picks["group"]) == {"global", "position"}
    table = ins.feature_table(run)
    for group, rows in picks.groupby("group"):
        live = table[(table["group"] == group) & (table["firing_rate"] > 0)]
        by = {"positional": "position_share", "frequent": "firing_rate"}
        for pick, column in by.items():
            chosen = rows[rows["pick"] == pick]
            assert len(chosen) == ins.GALLERY_SIZE and chosen[column].is_monotonic_decreasing
            assert chosen[column].min() >= live.drop(index=chosen["feature"])[column].max()
        drawn = rows[rows["pick"] == "random"]["feature"]
        assert len(drawn) == ins.GALLERY_SIZE and drawn.is_monotonic_increasing and drawn.isin(live["feature"]).all()
    # Planted negative: another seed draws other random features (and only those change).
    other = ins.gallery(run, seed=1)
    assert not other[other["pick"] == "random"]["feature"].equals(picks[picks["pick"] == "random"]["feature"])
    pd.testing.assert_frame_equal(other[other["pick"] != "random"], picks[picks["pick"] != "random"])


def test_write_galleries_replaces_its_runs_rows_and_keeps_the_others(smoke):
    runs = ins.open_runs(smoke, ["hierarchical", "baseline"], layer=2)
    ins.write_galleries(smoke, runs)
    path = run_dir(smoke.name) / ins.INSPECT_CSV
    both = pd.read_csv(path)
    assert set(both["variant"]) == {"hierarchical", "baseline"} and len(both) == 3 * 8 * 3
    ins.write_galleries(smoke, runs[:1], size=2)
    now = pd.read_csv(path)
    assert len(now[now["variant"] == "hierarchical"]) == 2 * 2 * 3
    pd.testing.assert_frame_equal(now[now["variant"] == "baseline"].reset_index(drop=True),
                                  both[both["variant"] == "baseline"].reset_index(drop=True))


def test_summary_counts_live_and_positional_features_per_group(planted):
    run = ins.open_run(planted, "baseline", 0)
    s = ins.summary([run]).loc[(run.label, "all")]
    assert s["features"] == D and s["live"] == D - 1 and s["share > 0.5"] == 1


# --------------------------------------------------------------------------- the stage


def test_the_inspect_stage_shows_the_runs_the_reproduction_trains_and_owns_its_products():
    from posae.pipeline.stages import products, stage_list

    cfg = load_config("smoke", check_model=False)
    names = [s.name for s in stage_list(cfg)]
    assert names.index("ablations") < names.index("inspect") == names.index("figures") - 1
    stage = next(s for s in stage_list(cfg) if s.name == "inspect")
    assert stage.parameters["variants"] == ["baseline", "contrastive", "hierarchical"]
    assert set(stage.depends) == {"capture", "train:baseline", "train:contrastive", "train:hierarchical"}
    assert {p.key for p in products(cfg, stage)} == {"notebooks/07_inspect.ipynb", "notebooks/07_inspect.html",
                                                     ins.INSPECT_CSV}
    # With --variants leaving some out, it shows those that are trained (never a run no stage trains).
    sub = next(s for s in stage_list(cfg, ["soft_masking", "hierarchical"]) if s.name == "inspect")
    assert sub.parameters["variants"] == ["hierarchical"] and set(sub.depends) == {"capture", "train:hierarchical"}
    none = next(s for s in stage_list(cfg, ["soft_masking"]) if s.name == "inspect")
    assert none.parameters["variants"] == ["soft_masking"]
