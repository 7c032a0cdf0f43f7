"""Position probes, the unlearning score U and the disentanglement score U_x (notebook 04).

A probe is a logistic regression (standardised inputs) predicting a token's position bucket from a
representation. The bucket of position t in a context of L tokens is ⌊t·buckets/L⌋ (8 equal buckets
by default; position_masking uses the same buckets, docs/decisions.md §9). Probes train on 80% of the
validation sequences and are scored on the other 20%: the split is by sequence, so no sequence sits
on both sides (tokens of one sequence share content, which would leak). Tokens are subsampled
stratified by position so that every bucket is equally represented. These primitives (split,
subsample, fit, the sample of a layer) are `posae.eval.probing`, shared with notebook 02.

**U, SAE position input kept** (the paper's column). The paper (§5.2) defines its unlearning score
only in words, "a probe to predict feature positions ... measuring its error rate", and reports 0.0
for every variant. Ours: with acc_G and acc_P the held-out accuracies of probes on the global and on
the position-specific features, computed as the SAE is used (each token's true position fed to it),
and chance = 1/buckets,

    U = clip((acc_P − acc_G) / (1 − chance), 0, 1).

**U_x, the score that credits only the activation's position information.** Several variants feed
the position into the SAE (a learned p_t, masks, gates). Their position features can then read the
position from that input rather than from the activation: an SAE whose position group is the one-hot
of the fed position scores U ≈ 1 while it has learned nothing about the language model. The question
of the paper is whether the position-specific features capture the position information the model
carries. So U_x scores the same probes on features computed with the SAE's position input
*neutralised*: every token is fed a position drawn by shuffling the positions of the probe's tokens
(independent of its own, with the same distribution, so every SAE stays on the inputs it was trained
on). Whatever the probes read about the true bucket must then come from x:

    D_x = (acc_P_x − acc_G_x) / (1 − chance),   U_x = clip(D_x, 0, 1).

An SAE whose position group is a function of the fed position alone scores U_x ≈ 0; one whose
position group reads the position out of x keeps its U. Feeding one constant position instead also
cuts the input's information, but puts a masked or gated SAE where it never was in training (every
token in one bucket's block); notebook 04 compares the two on the real runs, and notebook 00 checks
both scores on planted data with known answers (an echo control and an oracle).

**Noise and the null.** Each run also scores a null: the same U_x probes with the position labels
permuted within each sequence (sequences kept whole, so the split is unchanged), which is what D_x
looks like when the features know nothing of position. The claims test D_x − D_x(null) over runs
(`posae.report.claims`); `D_x_se` is the within-run standard error of D_x, clustered by sequence.

**Sanity of the probe.** All features contain both groups, so acc_all should not fall below
max(acc_G, acc_P) by more than noise: `all_gap` and its clustered standard error say whether it
does (with 8,000 tokens it did, by 0.02-0.04: the probe on 640 features overfitted; 16,000 close it).

A variant with one undivided dictionary is scored on an arbitrary half split of it
(`SAE.probe_groups`, marked ``grouping = arbitrary``): its U and U_x measure no disentanglement.

`probe_all` probes every finished run of a config and writes runs/<config>/probes.csv.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd
import torch

from posae import checkpoint
from posae.checkpoint import find_runs
from posae.config import Config, ProbeConfig
from posae.data import models
from posae.data.store import ActivationStore, open_layer_stores
from posae.eval.metrics import check_normalisation
from posae.eval.probing import ProbeFit, cluster_se, fit_probe, probe_sample, raw_accuracy, sample_rows
from posae.paths import lock_path, locked, run_dir, sae_dir, write_csv_atomic
from posae.pool import spawn_pool
from posae.progress import progress_iter
from posae.saes import SAE, as_variant_list
from posae.saes.buckets import position_bucket

PROBES_CSV = "probes.csv"
COLUMNS = ["variant", "layer", "seed", "grouping", "position_input",
           "acc_global", "acc_position", "acc_all", "acc_raw", "U",
           "acc_global_x", "acc_position_x", "D_x", "D_x_se", "U_x",
           "acc_global_null", "acc_position_null", "D_x_null",
           "all_gap", "all_gap_se", "n_iter_max", "converged", "chance",
           "train_tokens", "test_tokens", "test_sequences"]


def unlearning_score(acc_position: float, acc_global: float, buckets: int) -> float:
    """U = clip((acc_P − acc_G) / (1 − 1/buckets), 0, 1): how much better the position group
    predicts position than the global group, relative to the room above chance."""
    return float(np.clip(score_difference(acc_position, acc_global, buckets), 0.0, 1.0))


def score_difference(acc_position: float, acc_global: float, buckets: int) -> float:
    """(acc_P − acc_G) / (1 − 1/buckets), unclipped: what the tests average (clipping at 0 biases a mean)."""
    return float((acc_position - acc_global) / (1.0 - 1.0 / buckets))


# --------------------------------------------------------------------------- the probes' tokens


class ProbeTokens(NamedTuple):
    """One layer's probe tokens, train and test: normalised activations, positions, sequence ids, buckets."""

    x_train_ND: np.ndarray
    pos_train_N: np.ndarray
    seq_train_N: np.ndarray
    y_train_N: np.ndarray
    x_test_ND: np.ndarray
    pos_test_N: np.ndarray
    seq_test_N: np.ndarray
    y_test_N: np.ndarray


def probe_tokens(store: ActivationStore, probe_cfg: ProbeConfig, buckets: int) -> ProbeTokens:
    """The probe sample of `store` (`posae.eval.probing.probe_sample`), loaded."""
    s = probe_sample(store, probe_cfg, buckets)
    pos_N, seq_N = np.asarray(store.pos_N), np.asarray(store.seq_N)
    return ProbeTokens(store.normalised(s.train_rows).numpy(), pos_N[s.train_rows], seq_N[s.train_rows], s.y_train,
                       store.normalised(s.test_rows).numpy(), pos_N[s.test_rows], seq_N[s.test_rows], s.y_test)


def tokens_from_arrays(x_ND: np.ndarray, pos_N: np.ndarray, seq_N: np.ndarray, seq_len: int, buckets: int,
                       probe_cfg: ProbeConfig) -> ProbeTokens:
    """The probe sample of tokens held in memory (activations on the normalised scale), drawn as from a store."""
    pos_N, seq_N = np.asarray(pos_N), np.asarray(seq_N)
    s = sample_rows(pos_N, seq_N, seq_len, probe_cfg, buckets)
    x_ND = np.asarray(x_ND, dtype=np.float32)
    return ProbeTokens(x_ND[s.train_rows], pos_N[s.train_rows], seq_N[s.train_rows], s.y_train,
                       x_ND[s.test_rows], pos_N[s.test_rows], seq_N[s.test_rows], s.y_test)


def shuffled_positions(pos_N: np.ndarray, seed: int) -> np.ndarray:
    """The positions of the tokens, shuffled across them: a fed position independent of each token's own."""
    return np.random.default_rng(seed).permutation(np.asarray(pos_N))


def permuted_within(values_N: np.ndarray, groups_N: np.ndarray, seed: int) -> np.ndarray:
    """`values_N` permuted among the tokens of each group (sequence): the null's labels."""
    values_N, groups_N = np.asarray(values_N), np.asarray(groups_N)
    by_group = np.argsort(groups_N, kind="stable")
    shuffled = np.lexsort((np.random.default_rng(seed).random(len(groups_N)), groups_N))
    out = np.empty_like(values_N)
    out[by_group] = values_N[shuffled]
    return out


# --------------------------------------------------------------------------- probing SAEs


@torch.inference_mode()
def encode_array(sae: SAE, x_ND: np.ndarray, pos_N: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The SAE's features of activations `x_ND` fed positions `pos_N`, float32 [N, K], on the SAE's device."""
    device = sae.W_dec_KD.device
    parts = [sae.encode(torch.from_numpy(np.ascontiguousarray(x_ND[s:s + chunk])).to(device),
                        torch.from_numpy(np.asarray(pos_N[s:s + chunk], dtype=np.int64)).to(device)).float().cpu().numpy()
             for s in range(0, len(x_ND), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, sae.k), dtype=np.float32)


def _cols(f_NK: np.ndarray, r: range) -> np.ndarray:
    return f_NK[:, r.start:r.stop]


def score_sae(sae: SAE, tokens: ProbeTokens, buckets: int, probe_cfg: ProbeConfig) -> dict[str, object]:
    """Every probe column of one SAE on one layer's tokens (`COLUMNS`, without identity and acc_raw).

    `sae` needs only ``encode(x_BD, pos_B)``, ``probe_groups()``, ``groups`` and ``k``, so a planted
    control (notebook 00) is scored by the same code as a trained variant.
    """
    t, pc, chance = tokens, probe_cfg, 1.0 / buckets
    groups = sae.probe_groups()
    g, p = groups["global"], groups["position"]

    def fit(tr: np.ndarray, te: np.ndarray, y_tr: np.ndarray = t.y_train_N, y_te: np.ndarray = t.y_test_N) -> ProbeFit:
        return fit_probe(tr, y_tr, te, y_te, pc.C, pc.max_iter, pc.seed)

    f_tr, f_te = encode_array(sae, t.x_train_ND, t.pos_train_N), encode_array(sae, t.x_test_ND, t.pos_test_N)
    fed_tr, fed_te = shuffled_positions(t.pos_train_N, pc.seed), shuffled_positions(t.pos_test_N, pc.seed + 1)
    n_tr, n_te = encode_array(sae, t.x_train_ND, fed_tr), encode_array(sae, t.x_test_ND, fed_te)
    kept = {"global": fit(_cols(f_tr, g), _cols(f_te, g)), "position": fit(_cols(f_tr, p), _cols(f_te, p)),
            "all": fit(f_tr, f_te)}
    # A group whose features do not depend on the fed position keeps its fit (the same numbers).
    changed = {name: not (np.array_equal(_cols(f_tr, r), _cols(n_tr, r)) and np.array_equal(_cols(f_te, r), _cols(n_te, r)))
               for name, r in (("global", g), ("position", p))}
    neutral = {name: fit(_cols(n_tr, r), _cols(n_te, r)) if changed[name] else kept[name]
               for name, r in (("global", g), ("position", p))}
    uses_position = any(changed.values())
    y_null_tr = permuted_within(t.y_train_N, t.seq_train_N, pc.seed + 2)
    y_null_te = permuted_within(t.y_test_N, t.seq_test_N, pc.seed + 3)
    null = {name: fit(_cols(n_tr, r), _cols(n_te, r), y_null_tr, y_null_te) for name, r in (("global", g), ("position", p))}

    scale = 1.0 - chance
    d_x = score_difference(neutral["position"].accuracy, neutral["global"].accuracy, buckets)
    best = max(kept["global"], kept["position"], key=lambda f: f.accuracy)
    fits = [*kept.values(), *neutral.values(), *null.values()]
    return {
        "grouping": "learned" if sae.groups is not None else "arbitrary",
        "position_input": "used" if uses_position else "ignored",
        "acc_global": kept["global"].accuracy, "acc_position": kept["position"].accuracy,
        "acc_all": kept["all"].accuracy,
        "U": unlearning_score(kept["position"].accuracy, kept["global"].accuracy, buckets),
        "acc_global_x": neutral["global"].accuracy, "acc_position_x": neutral["position"].accuracy,
        "D_x": d_x,
        "D_x_se": cluster_se(neutral["position"].correct_N.astype(float) - neutral["global"].correct_N, t.seq_test_N) / scale,
        "U_x": float(np.clip(d_x, 0.0, 1.0)),
        "acc_global_null": null["global"].accuracy, "acc_position_null": null["position"].accuracy,
        "D_x_null": score_difference(null["position"].accuracy, null["global"].accuracy, buckets),
        "all_gap": kept["all"].accuracy - best.accuracy,
        "all_gap_se": cluster_se(kept["all"].correct_N.astype(float) - best.correct_N, t.seq_test_N),
        "n_iter_max": max(f.n_iter for f in fits), "converged": all(f.converged for f in fits),
        "chance": chance, "train_tokens": len(t.y_train_N), "test_tokens": len(t.y_test_N),
        "test_sequences": int(len(np.unique(t.seq_test_N))),
    }


def position_input_comparison(sae: SAE, tokens: ProbeTokens, buckets: int, probe_cfg: ProbeConfig) -> dict[str, float]:
    """acc_P with one constant position (the middle one) fed to every token, and with shuffled positions
    scored against the bucket each token was *fed* (`score_sae` has it against the true bucket)."""
    t, pc = tokens, probe_cfg
    p = sae.probe_groups()["position"]
    middle = int(np.median(t.pos_train_N))
    fed_tr, fed_te = shuffled_positions(t.pos_train_N, pc.seed), shuffled_positions(t.pos_test_N, pc.seed + 1)

    def acc(pos_tr: np.ndarray, pos_te: np.ndarray, y_tr: np.ndarray = t.y_train_N, y_te: np.ndarray = t.y_test_N) -> float:
        tr = _cols(encode_array(sae, t.x_train_ND, pos_tr), p)
        te = _cols(encode_array(sae, t.x_test_ND, pos_te), p)
        return fit_probe(tr, y_tr, te, y_te, pc.C, pc.max_iter, pc.seed).accuracy

    return {"constant": acc(np.full_like(t.pos_train_N, middle), np.full_like(t.pos_test_N, middle)),
            "shuffled, vs fed bucket": acc(fed_tr, fed_te, position_bucket(fed_tr, sae.seq_len, buckets),
                                           position_bucket(fed_te, sae.seq_len, buckets))}


def input_comparison(cfg: Config, probes: pd.DataFrame, layer: int, seed: int = 0) -> pd.DataFrame:
    """The position group's accuracy under each position input, for the runs of `probes` (probes.csv rows) at
    `layer` and `seed` with learned groups that use their position input: true (acc_P), one constant, shuffled
    against the true bucket (acc_P_x) and against the fed one; beside acc_G. One row per variant."""
    device = models.resolve_device(cfg.model.device)
    store = open_layer_stores(cfg, "val")[layer]
    tokens = probe_tokens(store, cfg.probe, cfg.sae.buckets)
    picked = probes[(probes["layer"] == layer) & (probes["seed"] == seed) & (probes["grouping"] == "learned")
                    & (probes["position_input"] == "used")]
    rows = []
    for r in picked.itertuples():
        folder = sae_dir(cfg.name, r.variant, layer, seed)
        check_normalisation(folder, store)
        more = position_input_comparison(checkpoint.load_sae(folder, device), tokens, cfg.sae.buckets, cfg.probe)
        rows.append({"variant": r.variant, "acc_G": r.acc_global, "acc_P, true": r.acc_position,
                     "acc_P, constant": more["constant"], "acc_P, shuffled, vs true bucket": r.acc_position_x,
                     "acc_P, shuffled, vs fed bucket": more["shuffled, vs fed bucket"]})
    return pd.DataFrame(rows).set_index("variant") if rows else pd.DataFrame()


def probe_all(cfg: Config, variants: str | Iterable[str] | None = None, progress: bool = True,
              workers: int = 2) -> pd.DataFrame:
    """Probe every finished run of `cfg` (or of `variants`); writes runs/<config>/probes.csv atomically.

    One row per run, columns `COLUMNS`. With `variants` a subset, the file keeps the other variants'
    rows from an earlier call (the returned frame holds only the requested ones). Runs are checked
    against the validation store's normalisation. `workers` runs score side by side in worker processes
    (each fit is single-threaded and deterministic, so the result does not depend on it).
    """
    names = as_variant_list(variants)
    models.resolve_device(cfg.model.device)  # a device that is not there fails before any work
    folders = find_runs(cfg, names)
    stores = open_layer_stores(cfg, "val")
    pc, buckets = cfg.probe, cfg.sae.buckets
    layers = sorted({checkpoint.read_info(f)["layer"] for f in folders})
    raw = {layer: raw_accuracy(stores[layer], probe_sample(stores[layer], pc, buckets), pc) for layer in layers}
    for folder in folders:
        check_normalisation(folder, stores[checkpoint.read_info(folder)["layer"]])
    jobs = [(cfg, str(folder), raw[checkpoint.read_info(folder)["layer"]]) for folder in folders]
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        rows = list(progress_iter(map(_score_run, jobs), progress, "probe", total=len(jobs)))
    else:  # processes, not threads: lbfgs holds the interpreter lock between its BLAS calls
        with spawn_pool(workers) as pool:
            rows = list(progress_iter(pool.map(_score_run, jobs), progress, "probe", total=len(jobs)))
    df = pd.DataFrame(rows, columns=COLUMNS).sort_values(["variant", "layer", "seed"]).reset_index(drop=True)
    path = run_dir(cfg.name) / PROBES_CSV
    with locked(lock_path(path, "merge"), f"updating {PROBES_CSV}"):  # notebooks 04 run by hand side by side
        keep = pd.read_csv(path) if names is not None and path.exists() else None
        merged = df if keep is None else pd.concat([keep[~keep["variant"].isin(names)], df], ignore_index=True)
        write_csv_atomic(merged.sort_values(["variant", "layer", "seed"]).reset_index(drop=True), path)
    return df


_TOKENS: dict[tuple[str, ProbeConfig, int], ProbeTokens] = {}  # per process: each layer's probe tokens, loaded once


def _score_run(job: tuple[Config, str, float]) -> dict[str, object]:
    """probes.csv's row of one run (module level, so that a worker process can run it): `score_sae` on one
    torch thread, on its layer's probe tokens."""
    cfg, folder, acc_raw = job
    torch.set_num_threads(1)
    info = checkpoint.read_info(Path(folder))
    store = open_layer_stores(cfg, "val")[info["layer"]]
    key = (str(store.path), cfg.probe, cfg.sae.buckets)
    if key not in _TOKENS:
        _TOKENS[key] = probe_tokens(store, cfg.probe, cfg.sae.buckets)
    sae = checkpoint.load_sae(Path(folder), models.resolve_device(cfg.model.device))
    return {"variant": info["variant"], "layer": info["layer"], "seed": info["seed"],
            **score_sae(sae, _TOKENS[key], cfg.sae.buckets, cfg.probe), "acc_raw": acc_raw}


def positional_feature_counts(features: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Per variant and group: features whose position-variance share exceeds `threshold`, mean over runs.

    `features` is `posae.eval.metrics.evaluate_all(...).features`; dead features (share NaN) count as not
    positional. Columns: variant, grouping, group, positional (mean count per run), of (group size), share.
    """
    f = features.assign(positional=features["position_share"] > threshold)
    per_run = f.groupby(["variant", "grouping", "layer", "seed", "group"], as_index=False).agg(
        positional=("positional", "sum"), of=("feature", "size"))
    out = per_run.groupby(["variant", "grouping", "group"], as_index=False)[["positional", "of"]].mean()
    out["share"] = out["positional"] / out["of"]
    return out
