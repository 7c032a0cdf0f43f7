"""Is the probes' fixed regularisation (probe.C) at the optimum? Grouped cross-validation says.

For every run of one layer and seed of a finished config, and each feature set the scores use (the
global group, the position group and all features with the SAE's position input kept; the two groups
with it neutralised), this picks C on the probe's *training* tokens by k-fold cross-validation grouped
by sequence (no sequence in two folds), then scores both the chosen C and the config's C on the
held-out tokens. The fixed C is justified where the held-out accuracy it gives is within noise (two
clustered standard errors of the paired difference) of the cross-validated choice's.

    .venv/bin/python benchmarks/probe_regularisation.py [--config default] [--layer 8] [--seed 0]

Prints one row per run and feature set and writes benchmarks/probe_regularisation.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupKFold

from posae import checkpoint, provenance
from posae.checks import load_config
from posae.data.store import open_layer_stores
from posae.eval.probes import ProbeTokens, encode_array, probe_tokens, shuffled_positions
from posae.eval.probing import cluster_se, fit_probe

GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


def cv_choice(X: np.ndarray, y: np.ndarray, seq: np.ndarray, folds: int, max_iter: int) -> tuple[float, dict[float, float]]:
    """The C of `GRID` with the best mean accuracy over `folds` folds grouped by sequence, and every C's mean."""
    scores = {C: [] for C in GRID}
    for tr, va in GroupKFold(folds).split(X, y, seq):
        for C in GRID:
            scores[C].append(fit_probe(X[tr], y[tr], X[va], y[va], C, max_iter).accuracy)
    means = {C: float(np.mean(v)) for C, v in scores.items()}
    return max(means, key=means.get), means


def feature_sets(sae, t: ProbeTokens, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    f_tr, f_te = encode_array(sae, t.x_train_ND, t.pos_train_N), encode_array(sae, t.x_test_ND, t.pos_test_N)
    n_tr = encode_array(sae, t.x_train_ND, shuffled_positions(t.pos_train_N, seed))
    n_te = encode_array(sae, t.x_test_ND, shuffled_positions(t.pos_test_N, seed + 1))
    g, p = sae.probe_groups()["global"], sae.probe_groups()["position"]
    cols = lambda f, r: f[:, r.start:r.stop]  # noqa: E731
    return {"global": (cols(f_tr, g), cols(f_te, g)), "position": (cols(f_tr, p), cols(f_te, p)), "all": (f_tr, f_te),
            "global_x": (cols(n_tr, g), cols(n_te, g)), "position_x": (cols(n_tr, p), cols(n_te, p))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="default")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, check_model=False)
    pc = cfg.probe
    store = open_layer_stores(cfg, "val")[args.layer]
    t = probe_tokens(store, pc, cfg.sae.buckets)
    print(f"CPU: {provenance.cpu_model()}; config {cfg.name}, layer {args.layer}, seed {args.seed}; "
          f"{len(t.y_train_N)} train / {len(t.y_test_N)} test tokens; fixed C = {pc.C}; grid {GRID}; "
          f"{args.folds} folds grouped by sequence", flush=True)
    rows = []
    start = time.time()
    for folder in checkpoint.find_runs(cfg):
        info = checkpoint.read_info(folder)
        if info["layer"] != args.layer or info["seed"] != args.seed:
            continue
        sae = checkpoint.load_sae(folder, "cpu")
        for name, (tr, te) in feature_sets(sae, t, pc.seed).items():
            C_cv, means = cv_choice(tr, t.y_train_N, t.seq_train_N, args.folds, pc.max_iter)
            fixed = fit_probe(tr, t.y_train_N, te, t.y_test_N, pc.C, pc.max_iter, pc.seed)
            chosen = fixed if C_cv == pc.C else fit_probe(tr, t.y_train_N, te, t.y_test_N, C_cv, pc.max_iter, pc.seed)
            se = cluster_se(fixed.correct_N.astype(float) - chosen.correct_N, t.seq_test_N)
            rows.append({"variant": info["variant"], "features": name, "C_cv": C_cv,
                         "acc_fixed": fixed.accuracy, "acc_cv": chosen.accuracy,
                         "difference": fixed.accuracy - chosen.accuracy, "se": se,
                         "within_noise": abs(fixed.accuracy - chosen.accuracy) <= 2 * se + 1e-12,
                         "iterations": fixed.n_iter, "converged": fixed.converged,
                         **{f"cv_{C:g}": m for C, m in means.items()}})
            r = rows[-1]
            print(f"{r['variant']:20s} {name:11s} C_cv {C_cv:<5g} held-out {r['acc_fixed']:.3f} at C={pc.C:g} vs "
                  f"{r['acc_cv']:.3f} at C_cv ({r['difference']:+.3f} ± {se:.3f}); {r['iterations']} iterations",
                  flush=True)
    df = pd.DataFrame(rows)
    out = Path(__file__).with_suffix(".csv")
    df.to_csv(out, index=False)
    print(f"\n{int(df['within_noise'].sum())} of {len(df)} feature sets: the fixed C is within two clustered standard "
          f"errors of the cross-validated choice; largest shortfall {df['difference'].min():+.3f}; all converged: "
          f"{bool(df['converged'].all())}; {time.time() - start:.0f} s. Wrote {out}", file=sys.stdout)


if __name__ == "__main__":
    main()
