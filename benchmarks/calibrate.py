"""Calibrate the default config's λ1, learning rate and step budget on its real activations.

The default reproduction must train 60 SAEs (10 variants x 3 layers x 2 seeds) in about five
minutes on two cores, so the token budget per run is small; this sweep picks the batch size,
steps, learning rate and λ1 with which the baseline's L0 lands in 10-100 features per token and
its loss has flattened. Each row trains the baseline through the production path
(`posae.train.train_run`) and scores it on held-out validation tokens.

    .venv/bin/python benchmarks/calibrate.py                       # the sweep recorded in calibration.csv
    .venv/bin/python benchmarks/calibrate.py --variant contrastive --grid contrastive

Writes benchmarks/calibration.csv (appending to rows of other grids); the choice and its reason
are in the comments of params/default.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from posae import checkpoint
from posae.checks import load_config
from posae.config import TrainConfig
from posae.data.store import ActivationStore
from posae.paths import activations_dir
from posae.saes import variant_config
from posae.train import train_run

HERE = Path(__file__).resolve().parent

# Each grid is a list of points; a point sets TrainConfig fields and, for other keys, the variant's
# options. Fixed in every point: the schedule of params/default.yaml (warm-up, decay, λ1 ramp).
SCHEDULE = dict(lr_warmup=0.05, lr_decay=0.3, l1_warmup=0.1)
GRIDS = {
    # ~300k tokens per run (what 60 runs in ~5 minutes allow): learning rate x λ1 ...
    "lr_l1": [dict(batch_size=2048, steps=150, lr=lr, l1=l1)
              for lr, l1 in itertools.product([1e-3, 2e-3, 3e-3], [0.05, 0.08, 0.1, 0.15])],
    # ... then at the chosen point: the same tokens in other batch sizes, twice the tokens (has the loss
    # flattened?), and the resampling threshold.
    "budget": [dict(batch_size=b, steps=s, lr=2e-3, l1=0.08) for b, s in [(1024, 300), (4096, 75), (2048, 300)]]
              + [dict(batch_size=2048, steps=150, lr=2e-3, l1=0.08, resample_after=0.25)],
    # The step count matters more than the batch: the same tokens in 1024-token batches, on every layer
    # (run with --layers 3,8,13), at two λ1.
    "b1024": [dict(batch_size=1024, steps=300, lr=2e-3, l1=l1) for l1 in (0.08, 0.1)],
    # The contrastive term's temperature and weight λ2 at the chosen point (run with --variant contrastive
    # --probe), against the hierarchical model it extends (--variant hierarchical --grid reference --probe).
    "contrastive": [dict(batch_size=1024, steps=300, lr=2e-3, l1=0.1, temperature=t, weight=w)
                    for t, w in itertools.product([0.1, 0.3], [0.1, 0.3, 1.0])],
    "reference": [dict(batch_size=1024, steps=300, lr=2e-3, l1=0.1)],
}


@torch.no_grad()
def evaluate(folder: Path, val: ActivationStore, n_tokens: int, probe: bool = False) -> dict[str, float]:
    """Held-out reconstruction and sparsity (MSE on the normalised scale, EV, L0, L1, dead fraction),
    and with `probe` the position probes of notebook 04 (acc_global, acc_position, U)."""
    sae = checkpoint.load_sae(folder)
    idx = np.linspace(0, len(val) - 1, min(n_tokens, len(val))).astype(np.int64)
    x_BD = val.normalised(idx)
    pos_B = torch.from_numpy(val.pos_N[idx].astype(np.int64))
    out = sae(x_BD, pos_B)
    err = (out.x_hat - x_BD).square().sum()
    f = out.features
    row = {"val_mse": float(err) / x_BD.numel(),
           "val_ev": 1 - float(err) / float((x_BD - x_BD.mean(0)).square().sum()),
           "val_l0": float((f > 0).float().sum(-1).mean()), "val_l1": float(f.mean()),
           "val_dead": float(((f > 0).sum(0) == 0).float().mean())}
    row.update({k: float(v) for k, v in out.aux_losses.items()})
    g = sae.probe_groups()
    total = float(f.sum())
    row["global_share"] = float(f[:, g["global"].start : g["global"].stop].sum()) / max(total, 1e-12)
    if probe:
        from posae.config import ProbeConfig
        from posae.eval.probes import probe_sae
        from posae.eval.probing import probe_sample

        buckets = sae.cfg.buckets
        acc = probe_sae(sae, val, probe_sample(val, ProbeConfig(), buckets), buckets)
        row.update({k: acc[k] for k in ("acc_global", "acc_position", "U")})
    return row


def flatness(lines: list[dict]) -> float:
    """Relative drop of the training loss over the last fifth of the run (0 = flat)."""
    steps = np.array([m["step"] for m in lines])
    loss = np.array([m["losses/total"] for m in lines])
    at = lambda s: loss[np.argmin(np.abs(steps - s))]  # noqa: E731
    return float((at(0.8 * steps[-1]) - loss[-1]) / loss[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="default")
    ap.add_argument("--grid", default="lr_l1", choices=sorted(GRIDS))
    ap.add_argument("--variant", default="baseline")
    ap.add_argument("--layers", default="8", help="comma-separated layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--probe", action="store_true", help="also fit notebook 04's position probes (~10 s a run)")
    ap.add_argument("--out", default=str(HERE / "calibration.csv"))
    args = ap.parse_args()
    cfg = load_config(args.config, check_model=False)
    rows = []
    for layer in [int(x) for x in args.layers.split(",")]:
        store = ActivationStore.open(activations_dir(cfg.name, layer, "train"))
        val = ActivationStore.open(activations_dir(cfg.name, layer, "val"))
        for point in GRIDS[args.grid]:
            fields = {f.name for f in dataclasses.fields(TrainConfig)}
            train_keys = {**SCHEDULE, **{k: v for k, v in point.items() if k in fields}}
            options = {k: v for k, v in point.items() if k not in fields}
            run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_keys,
                                                                         log_every=max(1, point["steps"] // 20)))
            if options:
                run_cfg = dataclasses.replace(run_cfg, sae=dataclasses.replace(
                    run_cfg.sae, options={args.variant: options}))
            vcfg = variant_config(run_cfg, args.variant)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                folder = train_run(vcfg, args.variant, layer, args.seed, store, progress=False, out=Path(tmp) / "run")
                seconds = time.perf_counter() - t0
                lines = checkpoint.read_metrics(folder)
                row = {"grid": args.grid, "variant": args.variant, "layer": layer, "seed": args.seed,
                       "resample_after": vcfg.train.resample_after, **point,
                       "tokens": point["batch_size"] * point["steps"], "seconds": round(seconds, 2),
                       "train_loss": lines[-1]["losses/total"], "flatness": flatness(lines),
                       "train_l0": lines[-1]["metrics/l0"], "resampled": lines[-1]["metrics/resampled_fraction"],
                       **evaluate(folder, val, args.eval_tokens, args.probe)}
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    new = pd.DataFrame(rows)
    out = Path(args.out)
    if out.exists():
        old = pd.read_csv(out)
        new = pd.concat([old[~((old.grid == args.grid) & (old.variant == args.variant))], new], ignore_index=True)
    new.to_csv(out, index=False, float_format="%.5g")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
