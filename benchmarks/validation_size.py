"""How many validation sequences do the probes need? Their scores on the first n of the config's.

The probes draw a fixed number of tokens (probe.tokens, stratified by position) from the validation
sequences, so fewer sequences mean more tokens per sequence, not fewer tokens. If tokens of one
sequence were strongly correlated, the clustered standard error of D_x would grow as the sequences
shrink; this measures whether it does. For every run of one layer and seed of a finished config, it
scores the probes (`posae.eval.probes.score_sae`) on tokens drawn from the first n validation
sequences, for each n of --sizes (the largest is the config's own n_val: what notebook 04 scored).

    .venv/bin/python benchmarks/validation_size.py [--config default] [--layer 8] [--seed 0] [--sizes 1000,400,300]

Prints one row per run and size and writes benchmarks/validation_size.csv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from posae import checkpoint, provenance
from posae.checks import load_config
from posae.checkpoint import find_runs
from posae.data.store import open_layer_stores
from posae.eval.probes import score_sae, tokens_from_arrays

OUT = Path(__file__).with_suffix(".csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="default")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="1000,400,300", help="validation sequences to keep, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    store = open_layer_stores(cfg, "val")[args.layer]
    seq_N, pos_N = np.asarray(store.seq_N), np.asarray(store.pos_N)
    order = np.unique(seq_N)  # sequence ids in corpus order: the first n are what corpus.n_val = n captures
    x_ND = store.normalised(np.arange(len(store))).numpy()
    folders = [f for f in find_runs(cfg, None)
               if (i := checkpoint.read_info(f))["layer"] == args.layer and i["seed"] == args.seed]
    print(f"CPU: {provenance.cpu_model()}; config {cfg.name}, layer {args.layer}, seed {args.seed}, "
          f"{len(order)} validation sequences captured, {cfg.probe.tokens} probe tokens")
    rows = []
    for n in sorted({min(int(s), len(order)) for s in args.sizes.split(",")}, reverse=True):
        keep = np.isin(seq_N, order[:n])
        tokens = tokens_from_arrays(x_ND[keep], pos_N[keep], seq_N[keep], store.seq_len, cfg.sae.buckets, cfg.probe)
        for folder in folders:
            info = checkpoint.read_info(folder)
            t0 = time.perf_counter()
            r = score_sae(checkpoint.load_sae(folder, "cpu"), tokens, cfg.sae.buckets, cfg.probe)
            rows.append({"sequences": n, "variant": info["variant"], **{k: r[k] for k in (
                "U", "D_x", "D_x_se", "D_x_null", "all_gap", "all_gap_se", "test_sequences", "test_tokens")},
                "seconds": time.perf_counter() - t0})
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(OUT, index=False, float_format="%.4f")
    summary = df.groupby("sequences")[["D_x_se", "all_gap_se", "seconds"]].mean()
    print("\nmean over runs, by validation sequences kept:\n" + summary.to_string(float_format="%.4f"))


if __name__ == "__main__":
    main()
