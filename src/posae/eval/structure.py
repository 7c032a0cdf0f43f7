"""How position shows in raw activations, before any SAE (notebook 02).

Three views per layer: the activation norm by position, a PCA of activations coloured by position,
and the held-out accuracy of a logistic-regression probe reading the position bucket from the raw
activations (split by sequence, see `posae.eval.probing`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from posae.config import Config
from posae.data.store import ActivationStore
from posae.eval.probing import probe_sample, raw_accuracy, stratified_subsample


def norm_by_position(store: ActivationStore, max_tokens: int = 200_000, chunk: int = 16384) -> pd.DataFrame:
    """Mean and std of the raw and of the normalised activation norm at each position."""
    n = min(len(store), max_tokens)
    raw, normed = [], []
    for s in range(0, n, chunk):
        x_BD = store.raw(slice(s, min(s + chunk, n)))
        raw.append(x_BD.norm(dim=1).numpy())
        normed.append(store.normalise(x_BD).norm(dim=1).numpy())
    df = pd.DataFrame({"position": store.pos_N[:n], "norm": np.concatenate(raw),
                       "normalised_norm": np.concatenate(normed)})
    return df.groupby("position").agg(
        norm_mean=("norm", "mean"), norm_std=("norm", "std"),
        normalised_norm_mean=("normalised_norm", "mean")).reset_index()


def pca_by_position(store: ActivationStore, n_tokens: int = 4000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """The first two principal components of normalised activations, with each token's position.

    Returns the points and the explained-variance ratio of the two components.
    """
    idx = stratified_subsample(np.arange(len(store)), np.asarray(store.pos_N), n_tokens, seed)
    x_ND = store.normalised(idx).numpy().astype(np.float64)
    x_ND -= x_ND.mean(0)
    _, s, vt = np.linalg.svd(x_ND, full_matrices=False)
    pcs = x_ND @ vt[:2].T
    ratio = (s[:2] ** 2) / (s ** 2).sum()
    return pd.DataFrame({"pc1": pcs[:, 0], "pc2": pcs[:, 1], "position": store.pos_N[idx]}), ratio


def raw_position_probe(store: ActivationStore, cfg: Config) -> dict[str, float]:
    """Held-out accuracy of the position-bucket probe on raw (normalised) activations.

    The same sample as notebook 04's probes (`posae.eval.probing.probe_sample`), so its acc_raw equals this.
    """
    sample = probe_sample(store, cfg.probe, cfg.sae.buckets)
    acc = raw_accuracy(store, sample, cfg.probe)
    return {"probe/acc_raw": acc, "probe/chance": 1.0 / cfg.sae.buckets,
            "probe/train_tokens": float(len(sample.train_rows)), "probe/test_tokens": float(len(sample.test_rows))}
