"""Position probes and the unlearning score (notebook 04).

A probe is a logistic regression (standardised inputs) predicting a token's position bucket from a
representation. The bucket of position t in a context of L tokens is ⌊t·buckets/L⌋ (8 equal buckets
by default; position_masking uses the same buckets, docs/decisions.md §9). Probes train on 80% of the validation
sequences and are scored on the other 20%: the split is by sequence, so no sequence sits on both
sides (tokens of one sequence share content, which would leak). Tokens are subsampled stratified by
position so that every bucket is equally represented and a probe fits in about a second. These
primitives (split, subsample, fit, the sample of a layer) are `posae.eval.probing`, shared with notebook 02.

The unlearning score. The paper (§5.2) defines it only in words, "a probe to predict feature
positions ... measuring its error rate", and reports 0.0 for every variant. Ours (docs/decisions.md §7): with
acc_G and acc_P the held-out accuracies of probes on the global and on the position-specific
features, and chance = 1/buckets,

    U = clip((acc_P − acc_G) / (1 − chance), 0, 1)

so U = 1 when the position group reads position perfectly and the global group no better than
chance, and U = 0 when the global group knows position as well as the position group does. A
variant with one undivided dictionary is scored on an arbitrary half split of it (`SAE.probe_groups`,
marked ``grouping = arbitrary``): its U measures no disentanglement, only noise around 0.

`probe_all` probes every finished run of a config and writes runs/<config>/probes.csv.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
import torch

from posae import checkpoint
from posae.checkpoint import find_runs
from posae.config import Config
from posae.data import models
from posae.data.store import ActivationStore, open_layer_stores
from posae.eval.metrics import check_normalisation
from posae.eval.probing import ProbeSample, fit_probe, probe_sample, raw_accuracy
from posae.paths import lock_path, locked, run_dir, write_csv_atomic
from posae.progress import progress_iter
from posae.saes import SAE, as_variant_list

PROBES_CSV = "probes.csv"
COLUMNS = ["variant", "layer", "seed", "grouping", "acc_global", "acc_position", "acc_all", "acc_raw", "U", "chance",
           "train_tokens", "test_tokens"]


def unlearning_score(acc_position: float, acc_global: float, buckets: int) -> float:
    """U = clip((acc_P − acc_G) / (1 − 1/buckets), 0, 1): how much better the position group
    predicts position than the global group, relative to the room above chance."""
    return float(np.clip((acc_position - acc_global) / (1.0 - 1.0 / buckets), 0.0, 1.0))


# --------------------------------------------------------------------------- probing SAEs


@torch.inference_mode()
def encode_rows(sae: SAE, store: ActivationStore, rows_N: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The SAE's features of the store's rows `rows_N`, float32 [N, K], computed on the SAE's device."""
    device = sae.W_dec_KD.device
    parts = []
    for start in range(0, len(rows_N), chunk):
        idx = rows_N[start:start + chunk]
        pos_B = torch.from_numpy(np.asarray(store.pos_N[idx], dtype=np.int64)).to(device)
        parts.append(sae.encode(store.normalised(idx).to(device), pos_B).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, sae.k), dtype=np.float32)


def group_accuracies(f_train_NK: np.ndarray, f_test_NK: np.ndarray, sample: ProbeSample,
                     groups: dict[str, range], max_iter: int = 200, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of the probe on the global group, the position group and all features."""
    fit = {name: (f_train_NK[:, r.start:r.stop], f_test_NK[:, r.start:r.stop]) for name, r in groups.items()}
    fit["all"] = (f_train_NK, f_test_NK)
    return {f"acc_{name}": fit_probe(tr, sample.y_train, te, sample.y_test, max_iter, seed)
            for name, (tr, te) in fit.items()}


def probe_sae(sae: SAE, store: ActivationStore, sample: ProbeSample, buckets: int, max_iter: int = 200, seed: int = 0) -> dict[str, object]:
    """acc_global, acc_position, acc_all, U and chance of one SAE on one layer's probe sample."""
    f_train_NK = encode_rows(sae, store, sample.train_rows)
    f_test_NK = encode_rows(sae, store, sample.test_rows)
    acc = group_accuracies(f_train_NK, f_test_NK, sample, sae.probe_groups(), max_iter, seed)
    return {"grouping": "learned" if sae.groups is not None else "arbitrary", **acc,
            "U": unlearning_score(acc["acc_position"], acc["acc_global"], buckets), "chance": 1.0 / buckets}


def probe_all(cfg: Config, variants: str | Iterable[str] | None = None, progress: bool = True) -> pd.DataFrame:
    """Probe every finished run of `cfg` (or of `variants`); writes runs/<config>/probes.csv atomically.

    One row per run, columns `COLUMNS`. With `variants` a subset, the file keeps the other variants'
    rows from an earlier call (the returned frame holds only the requested ones). Runs are checked
    against the validation store's normalisation.
    """
    names = as_variant_list(variants)
    device = models.resolve_device(cfg.model.device)  # the SAEs encode there; the probes fit on the CPU
    folders = find_runs(cfg, names)
    stores = open_layer_stores(cfg, "val")
    pc, buckets = cfg.probe, cfg.sae.buckets
    samples = {layer: probe_sample(store, pc, buckets) for layer, store in stores.items()}
    raw = {layer: raw_accuracy(stores[layer], samples[layer], pc.max_iter, pc.seed)
           for layer in sorted({checkpoint.read_info(f)["layer"] for f in folders})}
    rows = []
    for folder in progress_iter(folders, progress, "probe"):
        info = checkpoint.read_info(folder)
        store, sample = stores[info["layer"]], samples[info["layer"]]
        check_normalisation(folder, store)
        result = probe_sae(checkpoint.load_sae(folder, device), store, sample, buckets, pc.max_iter, pc.seed)
        rows.append({"variant": info["variant"], "layer": info["layer"], "seed": info["seed"], **result,
                     "acc_raw": raw[info["layer"]], "train_tokens": len(sample.train_rows),
                     "test_tokens": len(sample.test_rows)})
    df = pd.DataFrame(rows, columns=COLUMNS).sort_values(["variant", "layer", "seed"]).reset_index(drop=True)
    path = run_dir(cfg.name) / PROBES_CSV
    with locked(lock_path(path, "merge"), f"updating {PROBES_CSV}"):  # notebooks 04 run by hand side by side
        keep = pd.read_csv(path) if names is not None and path.exists() else None
        merged = df if keep is None else pd.concat([keep[~keep["variant"].isin(names)], df], ignore_index=True)
        write_csv_atomic(merged.sort_values(["variant", "layer", "seed"]).reset_index(drop=True), path)
    return df


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
