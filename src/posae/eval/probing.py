"""The probe primitives both notebook 02 (raw activations) and notebook 04 (SAE features) use.

A probe is a standardised multinomial logistic regression predicting a token's position bucket
(`posae.saes.buckets.position_bucket`). Its tokens are split by sequence (no sequence on both sides:
tokens of one sequence share content, which would leak) and subsampled stratified by position.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from posae.config import ProbeConfig
from posae.data.store import ActivationStore
from posae.saes.buckets import position_bucket


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


class ProbeFit(NamedTuple):
    """One fitted probe: held-out accuracy, which held-out tokens it got right, and whether it converged."""

    accuracy: float
    correct_N: np.ndarray  # bool [N_test]
    n_iter: int
    converged: bool


def fit_probe(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
              C: float = 0.1, max_iter: int = 1000, seed: int = 0) -> ProbeFit:
    """A standardised multinomial logistic regression (L2 penalty `C`, lbfgs), scored on held-out tokens.

    C = 0.1 is the grouped-cross-validation optimum on the default run's features within noise
    (`benchmarks/probe_regularisation.py`); fits converge in well under `max_iter`, and one that does not
    says so (`converged`), so a reader can tell a lower bound from an optimum. BLAS runs on one thread: on
    a 2-core machine shared with other work, OpenBLAS's threads contend (a fit took 3-8 s on two threads
    against 0.4 s on one); `probe_all` runs two fits side by side instead.
    """
    # Here, not at the top: scikit-learn's import is ~1.3 s, which every notebook kernel would pay (this module
    # comes with posae.report.tables), and only the probe stages fit.
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    y_test = np.asarray(y_test)
    keep = X_train.std(0) > 0 if X_train.shape[1] else np.zeros(0, dtype=bool)
    if not keep.any():  # no feature varies (none given, or all dead): the majority class
        correct = y_test == np.bincount(y_train).argmax()
        return ProbeFit(float(correct.mean()), correct, 0, True)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train[:, keep], y_train)
        correct = clf.predict(X_test[:, keep]) == y_test
    n_iter = int(np.max(clf[-1].n_iter_))
    return ProbeFit(float(correct.mean()), correct, n_iter, n_iter < max_iter)


def cluster_se(values_N: np.ndarray, groups_N: np.ndarray) -> float:
    """Standard error of the mean of `values_N` when tokens of one group (sequence) are not independent.

    The cluster-robust (sandwich) estimate: the spread of per-sequence sums around their expectation,
    with the small-sample factor G/(G − 1). Tokens of one sequence share their content, so counting
    tokens as independent would understate the noise.
    """
    values_N, groups_N = np.asarray(values_N, dtype=np.float64), np.asarray(groups_N)
    n = len(values_N)
    if n == 0:
        return float("nan")
    _, inverse = np.unique(groups_N, return_inverse=True)
    resid_G = np.bincount(inverse, weights=values_N - values_N.mean())
    g = len(resid_G)
    return float(np.sqrt(g / max(g - 1, 1) * np.sum(resid_G ** 2)) / n) if g > 1 else float("nan")


class ProbeSample(NamedTuple):
    """The tokens one layer's probes train and test on, and their buckets; shared by every run of the layer."""

    train_rows: np.ndarray
    test_rows: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def probe_sample(store: ActivationStore, probe_cfg: ProbeConfig, buckets: int) -> ProbeSample:
    """Split the store's sequences, subsample each side stratified by position, label the buckets.

    The same draw as notebook 02's raw-activation probe (`posae.eval.structure.raw_position_probe`), so
    acc_raw here equals the accuracy shown there.
    """
    return sample_rows(np.asarray(store.pos_N), np.asarray(store.seq_N), store.seq_len, probe_cfg, buckets)


def sample_rows(pos_N: np.ndarray, seq_N: np.ndarray, seq_len: int, probe_cfg: ProbeConfig,
                buckets: int) -> ProbeSample:
    """`probe_sample` for tokens given by their positions and sequence ids (a store's, or planted data's)."""
    split = split_by_sequence(seq_N, probe_cfg.test_fraction, probe_cfg.seed)
    n_train = int(probe_cfg.tokens * (1 - probe_cfg.test_fraction))
    tr = stratified_subsample(split.train_idx, pos_N, n_train, probe_cfg.seed)
    te = stratified_subsample(split.test_idx, pos_N, probe_cfg.tokens - n_train, probe_cfg.seed + 1)
    y_N = position_bucket(pos_N, seq_len, buckets)
    return ProbeSample(tr, te, y_N[tr], y_N[te])


def raw_accuracy(store: ActivationStore, sample: ProbeSample, probe_cfg: ProbeConfig) -> float:
    """The same probe on the normalised activations themselves: what an SAE's features could reach."""
    return fit_probe(store.normalised(sample.train_rows).numpy(), sample.y_train,
                     store.normalised(sample.test_rows).numpy(), sample.y_test,
                     probe_cfg.C, probe_cfg.max_iter, probe_cfg.seed).accuracy
