"""Position probes: logistic regression predicting a token's position bucket from a representation.

The bucket of position t in a context of L tokens is ⌊t·buckets/L⌋ (8 equal buckets by default).
Probes train on 80% of the sequences and are scored on the other 20%: the split is by sequence,
so no sequence sits on both sides (tokens of one sequence share content, which would leak).
Tokens are subsampled stratified by position so that every bucket is equally represented and a
probe fits in about a second.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def position_bucket(pos_N: np.ndarray, seq_len: int, buckets: int) -> np.ndarray:
    """⌊t·buckets/L⌋ for each position t in [0, L)."""
    pos_N = np.asarray(pos_N, dtype=np.int64)
    if pos_N.size and (pos_N.min() < 0 or pos_N.max() >= seq_len):
        raise ValueError(f"positions must lie in [0, {seq_len}), got {pos_N.min()}..{pos_N.max()}")
    return (pos_N * buckets) // seq_len


class Split(NamedTuple):
    train_idx: np.ndarray
    test_idx: np.ndarray


def split_by_sequence(seq_N: np.ndarray, test_fraction: float, seed: int) -> Split:
    """Row indices of train and test tokens, with whole sequences on one side each."""
    seq_N = np.asarray(seq_N)
    seqs = np.unique(seq_N)
    rng = np.random.default_rng(seed)
    n_test = max(1, int(round(test_fraction * len(seqs)))) if len(seqs) > 1 else 0
    test_seqs = rng.permutation(seqs)[:n_test]
    is_test = np.isin(seq_N, test_seqs)
    return Split(np.flatnonzero(~is_test), np.flatnonzero(is_test))


def stratified_subsample(idx: np.ndarray, pos_N: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most `n` of the rows `idx`, the same number from every position, sorted (memmap-friendly)."""
    idx = np.asarray(idx)
    if len(idx) <= n:
        return np.sort(idx)
    rng = np.random.default_rng(seed)
    positions = pos_N[idx]
    uniq = np.unique(positions)
    per = max(1, n // len(uniq))
    chosen = [rng.permutation(idx[positions == p])[:per] for p in uniq]
    return np.sort(np.concatenate(chosen))


def fit_probe(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
              max_iter: int = 200, seed: int = 0) -> float:
    """Held-out accuracy of a standardised multinomial logistic regression."""
    if X_train.shape[1] == 0:
        return float(np.mean(y_test == np.bincount(y_train).argmax()))
    # Constant columns (dead features) carry nothing; dropping them keeps the scaler finite.
    keep = X_train.std(0) > 0
    if not keep.any():
        return float(np.mean(y_test == np.bincount(y_train).argmax()))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    clf.fit(X_train[:, keep], y_train)
    return float(clf.score(X_test[:, keep], y_test))


def unlearning_score(acc_position: float, acc_global: float, buckets: int) -> float:
    """U = clip((acc_P − acc_G) / (1 − 1/buckets), 0, 1): how much better the position group
    predicts position than the global group, relative to the room above chance."""
    return float(np.clip((acc_position - acc_global) / (1.0 - 1.0 / buckets), 0.0, 1.0))
