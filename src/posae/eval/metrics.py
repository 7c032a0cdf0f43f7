"""Reconstruction and sparsity of trained SAEs on validation activations (docs/decisions.md §7, §9; notebook 04).

One streaming pass over a fixed set of whole validation sequences accumulates sufficient statistics
(`Sums`); everything reported is a pure function of them, with namespaced keys:

    val/mse                   per-element squared error on the normalised scale (centred, mean squared
                              norm d), so predicting the mean scores ≈ 1.0 and MSE ≈ 1 − explained variance
    val/explained_variance    1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²
    sparsity/l0               active features per token
    sparsity/l1               ‖f‖₁ per token
    sparsity/mean_activation  ‖f‖₁ / k per token: the per-feature mean activation, the scale the paper's
                              "L1 < 0.1" fits (docs/decisions.md §9 Scales); training's metrics/l1 is this same number
    sparsity/dead_fraction    share of features that never fire on these tokens (docs/decisions.md §9: dead features
                              are measured on validation activations, not only by a training counter)
    <group>/l0, <group>/l1, <group>/dead_fraction
    <group>/magnitude_share   the group's share of Σ‖f‖₁; decoder rows have unit norm, so this is also its
                              share of the summed norms of the features' contributions to x̂
    <group>/mse_without       val/mse when the group's features are set to zero before decoding

`<group>` is `global` and `position` (`SAE.probe_groups`); for a variant with one undivided
dictionary they are an arbitrary half split, marked by `grouping = "arbitrary"` in the tables.
Per position: `mse_by_position`. Per feature: `feature_table`, including the share of the feature's
activation variance explained by position (`position_variance_share`).

`evaluate_all` runs the pass for every finished run of a config and writes three tables under
``runs/<config>/``: val_metrics.csv, mse_by_position.csv and feature_stats.csv. Each row carries an
`eval_key` (a hash of the weights, the validation store and the evaluation settings), so a second
call (05_ablations after 04_probe) reuses rows that are still valid instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd
import torch

from posae import checkpoint
from posae.config import Config
from posae.data import models
from posae.data.store import ActivationStore, open_layer_stores
from posae.paths import lock_path, locked, run_dir, write_csv_atomic
from posae.progress import progress_iter
from posae.saes import SAE, as_variant_list

METRICS_VERSION = 2  # bump when a definition changes: cached rows with an older key are recomputed
METRICS_CSV, BY_POSITION_CSV, FEATURES_CSV = "val_metrics.csv", "mse_by_position.csv", "feature_stats.csv"
RUN_KEYS = ["variant", "layer", "seed"]


class StaleRun(RuntimeError):
    """An SAE run and the activation store it is evaluated on do not belong together."""


# --------------------------------------------------------------------------- sufficient statistics


@dataclass
class Sums:
    """Running sums of one SAE over a set of validation tokens (float64 throughout)."""

    d_model: int
    n_features: int
    seq_len: int
    groups: dict[str, range]
    learned_groups: bool  # False: `groups` is the arbitrary half split of an undivided dictionary
    n: int = 0
    sq_err: float = 0.0  # Σ‖x − x̂‖²
    x_sq: float = 0.0  # Σ‖x‖²
    x_sum_D: np.ndarray = field(init=False)  # Σx, for the variance around the evaluated tokens' own mean
    sq_err_T: np.ndarray = field(init=False)  # Σ‖x − x̂‖² at each position
    count_T: np.ndarray = field(init=False)  # tokens at each position
    act_sum_K: np.ndarray = field(init=False)  # Σf per feature
    act_sq_K: np.ndarray = field(init=False)  # Σf² per feature
    fired_K: np.ndarray = field(init=False)  # tokens on which each feature is > 0
    act_sum_TK: np.ndarray = field(init=False)  # Σf per position and feature
    sq_err_without: dict[str, float] = field(init=False)  # Σ‖x − x̂‖² with one group's features zeroed
    covered: dict[str, float] = field(init=False)  # tokens on which any feature of the group is > 0

    def __post_init__(self) -> None:
        T, K, D = self.seq_len, self.n_features, self.d_model
        self.x_sum_D = np.zeros(D)
        self.sq_err_T, self.count_T = np.zeros(T), np.zeros(T)
        self.act_sum_K, self.act_sq_K, self.fired_K = np.zeros(K), np.zeros(K), np.zeros(K)
        self.act_sum_TK = np.zeros((T, K))
        self.sq_err_without = {g: 0.0 for g in self.groups}
        self.covered = {g: 0.0 for g in self.groups}


def eval_rows(store: ActivationStore, n_sequences: int | None, seed: int) -> np.ndarray:
    """Rows of `n_sequences` whole validation sequences drawn at random (all when None), sorted.

    Whole sequences keep every position equally represented, so the MSE-by-position curve and the
    per-position feature means are not tilted by the sample.
    """
    seq_N = np.asarray(store.seq_N)
    seqs = np.unique(seq_N)
    if n_sequences is not None and n_sequences < len(seqs):
        seqs = np.random.default_rng(seed).choice(seqs, n_sequences, replace=False)
        return np.flatnonzero(np.isin(seq_N, seqs))
    return np.arange(len(seq_N))


@torch.inference_mode()
def accumulate(sae: SAE, store: ActivationStore, rows_N: np.ndarray, chunk: int = 4096) -> Sums:
    """One pass of `sae` over the store's rows `rows_N`, `chunk` tokens at a time.

    Sums within a chunk are float32 and across chunks float64. The error without a group uses
    that every variant's decoder is x̂ = f W_dec + (terms that do not depend on f) (`SAE.decode`),
    so zeroing the group adds back f_group W_dec[group]: half a decoder matmul per group.
    Runs on the SAE's device (`checkpoint.load_sae(folder, device)`); only the per-chunk sums come back.
    """
    groups = sae.probe_groups()
    s = Sums(sae.d_model, sae.k, store.seq_len, groups, sae.groups is not None)
    W_dec_KD = sae.W_dec_KD.float()
    device = W_dec_KD.device
    for start in range(0, len(rows_N), chunk):
        idx = rows_N[start:start + chunk]
        x_BD = store.normalised(idx).to(device)
        pos_B = torch.from_numpy(np.asarray(store.pos_N[idx], dtype=np.int64)).to(device)
        f_BK = sae.encode(x_BD, pos_B).float()
        r_BD = x_BD - sae.decode(f_BK, pos_B).float()
        err_B = r_BD.square().sum(1)
        s.n += len(idx)
        s.sq_err += float(err_B.sum())
        s.x_sq += float(x_BD.square().sum())
        s.x_sum_D += x_BD.sum(0).cpu().numpy()
        pos_np = pos_B.cpu().numpy()
        s.sq_err_T += np.bincount(pos_np, weights=err_B.cpu().numpy(), minlength=s.seq_len)
        s.count_T += np.bincount(pos_np, minlength=s.seq_len)
        s.act_sum_K += f_BK.sum(0).cpu().numpy()
        s.act_sq_K += f_BK.square().sum(0).cpu().numpy()
        s.fired_K += (f_BK > 0).sum(0).cpu().numpy()
        s.act_sum_TK += torch.zeros(s.seq_len, s.n_features, device=device).index_add_(0, pos_B, f_BK).cpu().numpy()
        for name, r in groups.items():
            back_BD = f_BK[:, r.start:r.stop] @ W_dec_KD[r.start:r.stop]
            s.sq_err_without[name] += float((r_BD + back_BD).square().sum())
            s.covered[name] += float((f_BK[:, r.start:r.stop] > 0).any(1).sum())
    if s.n == 0:
        raise ValueError(f"{store.path}: no rows to evaluate. Fix: pass a non-empty row selection")
    return s


# --------------------------------------------------------------------------- pure functions of the sums


def reconstruction_metrics(s: Sums) -> dict[str, float]:
    total_var = s.x_sq - float(s.x_sum_D @ s.x_sum_D) / s.n
    return {
        "val/mse": s.sq_err / (s.n * s.d_model),
        "val/explained_variance": 1.0 - s.sq_err / max(total_var, 1e-12),
        "val/tokens": float(s.n),
    }


def sparsity_metrics(s: Sums) -> dict[str, float]:
    l1 = float(s.act_sum_K.sum()) / s.n
    return {
        "sparsity/l0": float(s.fired_K.sum()) / s.n,
        "sparsity/l1": l1,
        "sparsity/mean_activation": l1 / s.n_features,
        "sparsity/dead_fraction": float((s.fired_K == 0).mean()),
    }


def group_metrics(s: Sums) -> dict[str, float]:
    """Per feature group: L0, L1, dead fraction, share of activation magnitude, MSE without the group, and
    coverage, the share of tokens on which any of its features is active (position_masking: a third have none)."""
    out: dict[str, float] = {}
    mass = float(s.act_sum_K.sum())
    for name, r in s.groups.items():
        sl = slice(r.start, r.stop)
        out[f"{name}/l0"] = float(s.fired_K[sl].sum()) / s.n
        out[f"{name}/l1"] = float(s.act_sum_K[sl].sum()) / s.n
        out[f"{name}/dead_fraction"] = float((s.fired_K[sl] == 0).mean()) if len(r) else float("nan")
        out[f"{name}/magnitude_share"] = float(s.act_sum_K[sl].sum()) / mass if mass > 0 else float("nan")
        out[f"{name}/mse_without"] = s.sq_err_without[name] / (s.n * s.d_model)
        out[f"{name}/coverage"] = s.covered[name] / s.n
    return out


def all_metrics(s: Sums) -> dict[str, float]:
    return {**reconstruction_metrics(s), **sparsity_metrics(s), **group_metrics(s)}


def mse_by_position(s: Sums) -> pd.DataFrame:
    """Per-element MSE at each position that occurs (BOS, usually absent, has no row)."""
    seen = np.flatnonzero(s.count_T)
    return pd.DataFrame({"position": seen, "mse": s.sq_err_T[seen] / (s.count_T[seen] * s.d_model),
                         "tokens": s.count_T[seen].astype(int)})


def position_variance_share(s: Sums) -> np.ndarray:
    """Per feature, between-position variance / total variance of its activation, in [0, 1] [K].

    1 means the position alone fixes the feature's value; 0 that its mean is the same at every
    position. NaN for a feature that never varies (dead). A feature that is confined to some
    positions but fires sparsely there scores roughly its firing rate inside them: the share says how
    much of its behaviour position *determines*; `bucket_mass_max` says where it lives. With n tokens
    per position, a feature unrelated to position scores about (T − 1)/N by chance.
    """
    n_T = s.count_T[:, None]
    mean_K = s.act_sum_K / s.n
    mean_TK = np.divide(s.act_sum_TK, n_T, out=np.zeros_like(s.act_sum_TK), where=n_T > 0)
    between_K = (n_T * (mean_TK - mean_K) ** 2).sum(0) / s.n
    total_K = s.act_sq_K / s.n - mean_K ** 2
    # Relative threshold: a constant feature's "variance" is rounding error of E[f²] − E[f]².
    varies_K = total_K > 1e-9 * s.act_sq_K / s.n
    share_K = np.divide(between_K, total_K, out=np.full_like(total_K, np.nan), where=varies_K)
    return np.clip(share_K, 0.0, 1.0)


def bucket_mass_max(s: Sums, buckets: int) -> np.ndarray:
    """Per feature, the largest share of its activation mass that falls in one position bucket [K].

    1/buckets for a feature spread evenly over the context, 1 for one confined to a bucket (as
    position_masking's position features are by construction); NaN for a dead feature.
    """
    bucket_T = (np.arange(s.seq_len) * buckets) // s.seq_len
    mass_BK = np.zeros((buckets, s.n_features))
    np.add.at(mass_BK, bucket_T, s.act_sum_TK)
    total_K = mass_BK.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total_K > 0, mass_BK.max(0) / total_K, np.nan)


def feature_table(s: Sums, buckets: int) -> pd.DataFrame:
    """One row per feature: its group, firing rate, mean activation, position-variance share, bucket mass."""
    group_K = np.empty(s.n_features, dtype=object)
    for name, r in s.groups.items():
        group_K[r.start:r.stop] = name
    return pd.DataFrame({
        "feature": np.arange(s.n_features), "group": group_K,
        "firing_rate": s.fired_K / s.n, "mean_activation": s.act_sum_K / s.n,
        "position_share": position_variance_share(s), "bucket_mass_max": bucket_mass_max(s, buckets),
    })


# --------------------------------------------------------------------------- runs on disk


class Evaluation(NamedTuple):
    metrics: pd.DataFrame  # one row per run: variant, layer, seed, grouping, eval_key, then the metric keys
    by_position: pd.DataFrame  # variant, layer, seed, position, mse, tokens
    features: pd.DataFrame  # variant, layer, seed, feature, group, firing_rate, mean_activation, position_share, ...


def check_normalisation(folder: Path, store: ActivationStore) -> None:
    """The run must have been trained on activations normalised exactly as `store`'s."""
    mean_D, scale = checkpoint.load_normalisation(folder)
    same_scale = abs(scale - store.scale) <= 1e-6 * max(abs(store.scale), 1e-12)
    if not same_scale or not np.allclose(mean_D.numpy(), store.mean_D, rtol=1e-5, atol=1e-6):
        raise StaleRun(f"{folder}: trained on activations normalised with scale {scale:.6g}, but {store.path} uses "
                       f"{store.scale:.6g} (or another mean): the activations were captured again after training. "
                       f"Fix: retrain this variant (notebooks/03_train.ipynb) on the current capture")


def eval_key(folder: Path, store: ActivationStore, n_sequences: int | None, seed: int, buckets: int) -> str:
    """What determines a run's evaluation: its weights, the validation store, the token sample, the buckets."""
    h = hashlib.sha256((Path(folder) / checkpoint.WEIGHTS).read_bytes())
    blob = {"weights": h.hexdigest(), "store": store.meta.get("hash"), "tokens": len(store),
            "sequences": n_sequences, "seed": seed, "buckets": buckets, "version": METRICS_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_run(folder: Path, store: ActivationStore, rows_N: np.ndarray, buckets: int,
                 chunk: int = 4096, device: torch.device | str = "cpu") -> Evaluation:
    """Load one run and evaluate it on the store's rows `rows_N`: one-row frames tagged with its identity."""
    check_normalisation(folder, store)
    info = checkpoint.read_info(folder)
    sae = checkpoint.load_sae(folder, device)
    s = accumulate(sae, store, rows_N, chunk)
    ident = {"variant": info["variant"], "layer": info["layer"], "seed": info["seed"]}
    grouping = "learned" if s.learned_groups else "arbitrary"
    return Evaluation(pd.DataFrame([{**ident, "grouping": grouping, **all_metrics(s)}]),
                      mse_by_position(s).assign(**ident),
                      feature_table(s, buckets).assign(**ident, grouping=grouping))


def evaluate_all(cfg: Config, variants: str | Iterable[str] | None = None, progress: bool = True,
                 write: bool = True, reuse: bool = True, workers: int = 2) -> Evaluation:
    """Evaluate every finished run of `cfg` (or of `variants`) on its layer's validation store.

    `reuse` takes rows of the tables already under runs/<config>/ whose `eval_key` still matches;
    `write` saves the tables there (atomically), keeping other variants' rows when `variants` is a subset.
    """
    names = as_variant_list(variants)
    device = models.resolve_device(cfg.model.device)  # a device that is not there fails before any work
    folders = checkpoint.find_runs(cfg, names)
    stores = open_layer_stores(cfg, "val")
    rows = {layer: eval_rows(store, cfg.probe.eval_sequences, cfg.probe.seed) for layer, store in stores.items()}
    old = read_evaluation(cfg) if reuse else None

    def one(folder: Path) -> Evaluation:
        info = checkpoint.read_info(folder)
        store = stores[info["layer"]]
        key = eval_key(folder, store, cfg.probe.eval_sequences, cfg.probe.seed, cfg.sae.buckets)
        cached = _cached(old, info, key)
        if cached is None:
            ev = evaluate_run(folder, store, rows[info["layer"]], cfg.sae.buckets, device=device)
            cached = Evaluation(*(df.assign(eval_key=key) for df in ev))
        return cached

    # Runs side by side, one torch thread each: a run's pass is small matmuls and reductions that two threads
    # share poorly. Each run's sums are the same whatever runs beside it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            parts = list(progress_iter(pool.map(one, folders), progress, "evaluate", total=len(folders)))
    finally:
        torch.set_num_threads(threads)
    result = Evaluation(*(_ordered(pd.concat([p[i] for p in parts], ignore_index=True)) for i in range(3)))
    if write:
        write_evaluation(cfg, result, names)
    return result


def read_evaluation(cfg: Config) -> Evaluation | None:
    """The tables under runs/<config>/, or None when any is missing."""
    paths = [run_dir(cfg.name) / name for name in (METRICS_CSV, BY_POSITION_CSV, FEATURES_CSV)]
    if not all(p.exists() for p in paths):
        return None
    return Evaluation(*(pd.read_csv(p) for p in paths))


def write_evaluation(cfg: Config, ev: Evaluation, variants: list[str] | None = None) -> None:
    # Read, merge and write under one lock: notebooks 04 run by hand side by side merge into the same tables.
    with locked(lock_path(run_dir(cfg.name) / METRICS_CSV, "merge"), f"updating {METRICS_CSV}"):
        old = read_evaluation(cfg) if variants is not None else None
        for i, name in enumerate((METRICS_CSV, BY_POSITION_CSV, FEATURES_CSV)):
            df = ev[i]
            if old is not None:
                df = _ordered(pd.concat([old[i][~old[i]["variant"].isin(variants)], df], ignore_index=True))
            write_csv_atomic(df, run_dir(cfg.name) / name)


def _cached(old: Evaluation | None, info: dict, key: str) -> Evaluation | None:
    if old is None or any("eval_key" not in df for df in old):
        return None
    picked = []
    for df in old:
        m = ((df["variant"] == info["variant"]) & (df["layer"] == info["layer"]) & (df["seed"] == info["seed"])
             & (df["eval_key"] == key))
        if not m.any():
            return None
        picked.append(df[m])
    return Evaluation(*picked)


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Identity columns first, rows sorted by variant, layer, seed (and position or feature)."""
    extra = [c for c in ("position", "feature") if c in df]
    first = [c for c in RUN_KEYS + ["grouping"] + extra if c in df]
    return df[first + [c for c in df if c not in first]].sort_values(RUN_KEYS + extra).reset_index(drop=True)


# --------------------------------------------------------------------------- tables for reading


def mean_std(df: pd.DataFrame, columns: list[str], by: str | list[str] = "variant", digits: int = 3) -> pd.DataFrame:
    """'mean ± std' strings of `columns` over the rows of each `by` group (seeds and layers), with n."""
    g = df.groupby(by)
    out = pd.DataFrame({c: [f"{m:.{digits}f} ± {sd:.{digits}f}" if np.isfinite(sd) else f"{m:.{digits}f}"
                            for m, sd in zip(g[c].mean(), g[c].std())] for c in columns}, index=g.size().index)
    out["runs"] = g.size()
    return out
