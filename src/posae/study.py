"""The robustness study (notebook 08, ``make study``): which verdicts on the paper's claims survive a longer
training budget and a matched sparsity. docs/study.md says what it asks and how to read it.

Four parts, each a set of grid points on one layer (`Grid.layer`: the middle captured layer, 8 by default)
unless said otherwise; every point is the study config with a few overrides (`posae.config.read_config`), so it
trains into its own ``runs/<derived name>/`` and reads the base config's activation stores:

- **budget**: six variants at 1×, 4× and 16× the config's optimizer steps (``train.steps``; warm-up, decay,
  λ1 ramp and the resampling threshold are fractions of the run, so they stretch with it), two seeds;
- **sparsity**: every registered variant at five values of the λ1 it trains with (``train.l1`` × its
  ``l1_scale``: 0.3–2.2 × the config's, L0 ≈ 255 to 10 for the baseline on layer 8), one seed: the EV–L0 and
  CE-score–L0 frontiers, and each variant's metrics read off its frontier at a common L0 (`at_l0`: linear in
  log L0, NaN outside the measured range);
- **contrastive**: λ2 (``sae.options.contrastive.weight``) ∈ {0, 0.1, 0.3, 1, 3} on every captured layer, two
  seeds, with the baseline beside it; the validation sequences are cut in two halves by sequence id (`halves`),
  λ2 is selected on one (`select_lambda2`) and every reported score comes from the other;
- **gate_init**: hierarchical with its gate starting at σ(G) = 0.12, 0.5 and 0.88, at 1× (two seeds) and 16× (one
  seed; the 0.5 start is the budget part's own run, two seeds).

A point equal to the study config (1×, the config's λ1, the variant's own λ2 and gate) has no overrides, so the
parts share its run folder: 124 distinct runs for 136 points by default (`grid_points`, `distinct_runs`).

Training goes to worker processes, one torch thread each (`train_all`, as `posae.eval.ground_truth.train_all`);
`posae.train.train_run` skips finished runs and resumes a killed one from its checkpoint. Evaluation reuses the
pipeline's functions: `posae.eval.metrics.evaluate_run` (reconstruction, sparsity, groups), `posae.eval.probes.
score_sae` (U, U_x and the null), `posae.eval.fidelity.measure` (CE-loss score, KL; the model loaded once per
study), `posae.eval.ablations.ablation_runs`; Table 1 and the verdicts are `posae.report.tables.table1` and
`posae.report.claims.claims` on tables built from the grid's runs. Each run's evaluation is cached under
``runs/<study>/study/`` with a key of its weights and settings, so a rerun evaluates only what changed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import pandas as pd

from posae.checks import load_config
from posae.config import Config, ConfigError, read_config
from posae.paths import figures_dir, run_dir, sae_dir, write_csv_atomic, write_json_atomic, write_text_atomic
from posae.pool import spawn_pool

STUDY_VERSION = 1  # bump when a cached evaluation's content changes: cached rows with another key are recomputed
PARTS = ("budget", "sparsity", "contrastive", "gate_init")
HALVES = ("select", "report")
BASELINE = "baseline"
GATED = "hierarchical"  # the variant whose gate start the gate-init part varies
CONTRASTIVE = "contrastive"


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Grid:
    """What the study trains. Counts of seeds take the config's first seeds (``train.seeds``)."""

    layer: int | None = None  # the budget, sparsity and gate-init parts' layer; None: the middle captured layer
    budget_variants: tuple[str, ...] = ("baseline", "hierarchical", "contrastive", "multiscale", "soft_masking",
                                        "position_masking")
    factors: tuple[int, ...] = (1, 4, 16)  # multiples of train.steps
    budget_seeds: int = 2
    # Multiples of the config's λ1 that each variant trains with (train.l1 x its l1_scale: a soft-masking variant
    # gets train.l1 / l1_scale, so every variant spans the same range). Measured on the default run's layer 8:
    # 0.3x-2.2x gave the baseline L0 255, 131, 33, 15, 10, hierarchical 251-11, position_masking 158-2.
    l1_factors: tuple[float, ...] = (0.3, 0.5, 1.0, 1.5, 2.2)
    sparsity_variants: tuple[str, ...] | None = None  # None: every registered variant
    sparsity_seeds: int = 1
    lambda2s: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0)  # contrastive's weight λ2
    contrastive_layers: tuple[int, ...] | None = None  # None: every captured layer
    contrastive_seeds: int = 2
    gate_means: tuple[float, ...] = (0.12, 0.5, 0.88)  # σ(G) at the start; 0.12 is the paper's reported gate
    gate_factors: tuple[int, ...] = (1, 16)
    gate_seeds: tuple[int, ...] = (2, 1)  # seeds at each of gate_factors (16x: one, for the time cap)
    # λ2 selection (on the selection half): the largest excess of D_x over its null among the λ2 whose MSE costs
    # at most the paper's own contrastive cost (+8% over the baseline) and that leave at most 5% dead features.
    max_mse_ratio: float = 1.08
    max_dead: float = 0.05


# The whole grid on a small scale, for a smoke config (notebook 08's `sample`, the tests): every part, fewer points.
SAMPLE = Grid(budget_variants=("baseline", "hierarchical", "contrastive"), factors=(1, 2),
              l1_factors=(0.5, 1.0, 2.0), sparsity_variants=("baseline", "hierarchical", "soft_masking"),
              lambda2s=(0.0, 0.3, 1.0), gate_factors=(1, 2), gate_seeds=(1, 1), max_mse_ratio=10.0, max_dead=1.0)


class Point(NamedTuple):
    """One grid point: a run of `variant` at `layer` and `seed` under the study config with `overrides`."""

    part: str
    variant: str
    layer: int
    seed: int
    factor: int  # steps = factor x train.steps
    l1: float  # train.l1 (the variant multiplies it by its l1_scale)
    weight: float  # contrastive's λ2 (NaN for other variants)
    gate_init: float  # hierarchical's initial gate logit (NaN for other variants)
    overrides: tuple[str, ...]  # key=value on top of the study config's own; () = the study config itself


def logit(p: float) -> float:
    """σ⁻¹(p), rounded to 4 decimals so that it names a run folder briefly (σ(±1.9924) = 0.12000, 0.88000)."""
    return round(math.log(p / (1.0 - p)), 4) + 0.0  # + 0.0: σ⁻¹(0.5) is 0.0, never -0.0


def study_layer(cfg: Config, grid: Grid) -> int:
    layers = list(cfg.capture.layers)
    layer = layers[len(layers) // 2] if grid.layer is None else grid.layer
    if layer not in layers:
        raise ConfigError(f"the study's layer {layer} is not captured by {cfg.source}. Fix: use one of {layers}")
    return layer


def _number(x: float) -> float:
    """A grid value as the schema would write it back, four significant digits (0.1 x 0.3 is 0.03, not
    0.030000000000000002), so equal settings give equal overrides and one run folder."""
    return float(f"{x:.4g}")


def grid_points(cfg: Config, grid: Grid = Grid()) -> list[Point]:
    """Every point of the four parts, in part order. Seeds are the config's first `*_seeds` seeds."""
    from posae.saes import REGISTRY, variant_config

    layer = study_layer(cfg, grid)
    seeds = list(cfg.train.seeds)
    base_l1 = cfg.train.l1
    own_weight = variant_config(cfg, CONTRASTIVE).sae.options["weight"]
    own_gate = variant_config(cfg, GATED).sae.options["gate_init"]

    def point(part: str, variant: str, at: int, seed: int, factor: int = 1, l1: float = base_l1,
              weight: float | None = None, gate: float | None = None) -> Point:
        weight = own_weight if weight is None and variant == CONTRASTIVE else weight
        gate = own_gate if gate is None and variant == GATED else gate
        items = []
        if factor != 1:
            items.append(f"train.steps={factor * cfg.train.steps}")
        if l1 != base_l1:
            items.append(f"train.l1={l1:g}")
        if variant == CONTRASTIVE and weight != own_weight:
            items.append(f"sae.options.{CONTRASTIVE}.weight={weight:g}")
        if variant == GATED and gate != own_gate:
            items.append(f"sae.options.{GATED}.gate_init={gate:g}")
        return Point(part, variant, at, seed, factor, l1, math.nan if weight is None else weight,
                     math.nan if gate is None else gate, tuple(sorted(items)))

    points = [point("budget", v, layer, s, factor=f)
              for v in grid.budget_variants for f in grid.factors for s in seeds[:grid.budget_seeds]]
    sparsity = sorted(REGISTRY) if grid.sparsity_variants is None else grid.sparsity_variants
    scale = {v: variant_config(cfg, v).train.l1_scale for v in sparsity}
    points += [point("sparsity", v, layer, s, l1=_number(m * base_l1 / scale[v]))
               for v in sparsity for m in grid.l1_factors for s in seeds[:grid.sparsity_seeds]]
    layers = list(cfg.capture.layers) if grid.contrastive_layers is None else list(grid.contrastive_layers)
    cs = seeds[:grid.contrastive_seeds]
    points += [point("contrastive", CONTRASTIVE, at, s, weight=_number(w)) for at in layers for w in grid.lambda2s
               for s in cs]
    points += [point("contrastive", BASELINE, at, s) for at in layers for s in cs]
    points += [point("gate_init", GATED, layer, s, factor=f, gate=logit(m))
               for m in grid.gate_means for f, n in zip(grid.gate_factors, grid.gate_seeds) for s in seeds[:n]]
    return points


@functools.lru_cache(maxsize=None)
def _point_config(source: str, overrides: tuple[str, ...]) -> Config:
    return read_config(source, list(overrides) or None)


def point_config(cfg: Config, p: Point) -> Config:
    """The study config with `p`'s overrides on top of its own (its derived name, its ancestor's stores)."""
    return _point_config(cfg.source, tuple(cfg.overrides) + p.overrides)


class Run(NamedTuple):
    """A distinct training run: the config it belongs to (by name), variant, layer, seed."""

    config: str
    variant: str
    layer: int
    seed: int


def run_of(cfg: Config, p: Point) -> Run:
    return Run(point_config(cfg, p).name, p.variant, p.layer, p.seed)


# What each part reads of a run (the union over the parts a shared run belongs to is evaluated).
NEEDS = {"budget": ("probes", "fidelity"), "sparsity": ("fidelity",), "contrastive": ("halves",), "gate_init": ()}


def distinct_runs(cfg: Config, points: list[Point]) -> dict[Run, tuple[Point, tuple[str, ...]]]:
    """Each distinct run with one point that trains it and what the parts read of it, sorted by name."""
    found: dict[Run, tuple[Point, set[str]]] = {}
    for p in points:
        r = run_of(cfg, p)
        found.setdefault(r, (p, set()))[1].update(NEEDS[p.part])
    return {r: (p, tuple(sorted(n))) for r, (p, n) in sorted(found.items())}


def grid_frame(cfg: Config, points: list[Point]) -> pd.DataFrame:
    """The grid as a table: one row per point, with its run's config name and folder."""
    rows = []
    for p in points:
        r = run_of(cfg, p)
        rows.append({**p._asdict(), "overrides": ",".join(p.overrides), "config": r.config,
                     "folder": str(sae_dir(r.config, p.variant, p.layer, p.seed))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- cost


# Seconds per optimizer step of one run on one thread of this machine (the 2-core CPU of the default run),
# layer 8 of the default config (d = k = 640, 1,024 tokens): 300-step runs measured 9.7 s (baseline), 10.3 s
# (hierarchical), 12.0 s (contrastive) with the machine's other core busy; a 1,200-step baseline 34 s, so a long
# run costs steps x this (its 100-step checkpoints included). Other variants: the hierarchical figure.
STEP_SECONDS = {"baseline": 0.032, "position_weighted": 0.032, "hierarchical": 0.034, "contrastive": 0.040}
STEP_SECONDS_OTHER = 0.034
# Evaluation per run (same machine, one thread): metrics on 128 sequences 0.8 s, the seven probe fits 3-4 s,
# a fidelity splice ~0.75 s of CPU; the halves (metrics and probes on each) 12.8-13.4 s for a contrastive run on
# the default stores with the other core busy.
EVAL_SECONDS = {"metrics": 0.8, "probes": 3.5, "fidelity": 0.75, "halves": 12.0}
FIXED_SECONDS = 60.0  # kernel start, two worker pools, the model's load and clean passes, figures


def run_seconds(cfg: Config, p: Point) -> float:
    return (p.factor * cfg.train.steps) * STEP_SECONDS.get(p.variant, STEP_SECONDS_OTHER)


def cost(cfg: Config, points: list[Point], cores: int = 2) -> pd.DataFrame:
    """Estimated CPU seconds per part (a shared run counted where it is first met), and the wall time of the
    whole study on `cores` single-threaded workers (longest runs first). A default-config estimate."""
    runs = distinct_runs(cfg, points)
    rows = []
    for r, (p, needs) in runs.items():
        rows.append({"part": p.part, "runs": 1, "train_s": run_seconds(cfg, p),
                     "eval_s": EVAL_SECONDS["metrics"] + sum(EVAL_SECONDS[n] for n in needs)})
    df = pd.DataFrame(rows).groupby("part", sort=False).sum().reindex(PARTS).fillna(0)
    df["points"] = pd.Series([p.part for p in points]).value_counts().reindex(PARTS).fillna(0).astype(int)
    loads = [0.0] * cores
    for s in sorted((run_seconds(cfg, p) for p, _ in runs.values()), reverse=True):
        loads[loads.index(min(loads))] += s
    total_eval = float(df["eval_s"].sum())
    df.loc["total"] = df.sum()
    df.loc["total", "wall_min"] = (max(loads) + total_eval / cores + FIXED_SECONDS) / 60
    return df.reset_index().rename(columns={"index": "part"})


# --------------------------------------------------------------------------- training


@contextlib.contextmanager
def one_thread_env() -> Iterator[None]:
    """BLAS and OpenMP on one thread in the worker processes started inside (they read these at start)."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "POSAE_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def workers(jobs: int | None, n: int) -> int:
    return max(1, min(jobs or os.cpu_count() or 1, n))


def _pool_map(fn, args: list, jobs: int | None) -> list:
    """`fn` over `args` in `jobs` spawn processes of one thread each (in this process when one suffices)."""
    n = workers(jobs, len(args))
    if n == 1:
        import torch

        before = torch.get_num_threads()  # `fn` sets one thread, as in a worker: this process gets its own back
        try:
            return [fn(a) for a in args]
        finally:
            torch.set_num_threads(before)
    with one_thread_env(), spawn_pool(n) as pool:
        return list(pool.map(fn, args))


def train_all(cfg: Config, points: list[Point], jobs: int | None = None) -> dict[Run, Path]:
    """Train every distinct run of `points`, longest first, `jobs` side by side (default: one per core), each on
    one torch thread; `posae.train.train_run` skips finished runs and resumes unfinished ones. Each derived
    config's merged YAML goes to ``runs/<name>/environment/config.yaml`` first."""
    from posae.notebook import config_record

    runs = distinct_runs(cfg, points)
    for name in sorted({r.config for r in runs}):
        dcfg = next(point_config(cfg, p) for r, (p, _) in runs.items() if r.config == name)
        write_text_atomic(run_dir(name) / "environment" / "config.yaml", config_record(dcfg))
    order = sorted(runs.items(), key=lambda item: -run_seconds(cfg, item[1][0]))
    args = [(point_config(cfg, p), p.variant, p.layer, p.seed) for _, (p, _) in order]
    folders = _pool_map(_train_one, args, jobs)
    return {r: Path(f) for (r, _), f in zip(order, folders)}


_TRAIN_STORES: dict[tuple[str, int], Any] = {}  # per process: each layer's training store, opened (and checked) once


def _train_one(arg: tuple[Config, str, int, int]) -> str:
    """One run, in a worker process (module level, so that it pickles)."""
    import torch

    from posae.data import models
    from posae.data.store import open_layer_stores
    from posae.saes import variant_config
    from posae.train import train_run

    cfg, variant, layer, seed = arg
    torch.set_num_threads(1)
    key = (cfg.stores_name, layer)
    if key not in _TRAIN_STORES:
        _TRAIN_STORES[key] = open_layer_stores(cfg, "train", [layer])[layer]
    return str(train_run(variant_config(cfg, variant), variant, layer, seed, _TRAIN_STORES[key], progress=False,
                         device=models.resolve_device(cfg.model.device)))


# --------------------------------------------------------------------------- evaluation


def halves(seq_N: np.ndarray) -> dict[str, np.ndarray]:
    """The validation sequence ids cut in two by id: the lower half selects, the upper half reports.

    Sequences are numbered in corpus order, so a document's consecutive sequences mostly fall on one side: the
    halves share less text than an alternate split would.
    """
    ids = np.unique(np.asarray(seq_N))
    cut = len(ids) // 2
    return {"select": ids[:cut], "report": ids[cut:]}


def half_rows(seq_N: np.ndarray, ids: np.ndarray, n_sequences: int | None, seed: int) -> np.ndarray:
    """Rows of `n_sequences` whole sequences drawn among `ids` (all of them when None or fewer), sorted."""
    if n_sequences is not None and n_sequences < len(ids):
        ids = np.random.default_rng(seed).choice(ids, n_sequences, replace=False)
    return np.flatnonzero(np.isin(np.asarray(seq_N), ids))


def eval_key(folder: Path, store_hash: str | None, cfg: Config, needs: tuple[str, ...]) -> str:
    """What a cached evaluation depends on: the weights (their recorded digest), the validation store, the
    probe settings, the buckets, what was evaluated, and the versions of the definitions."""
    from posae import checkpoint
    from posae.eval.metrics import METRICS_VERSION

    info = checkpoint.check_run(folder)
    blob = {"weights": info["files"][checkpoint.WEIGHTS]["digest"], "run": info["run_hash"], "store": store_hash,
            "probe": dataclasses.asdict(cfg.probe), "buckets": cfg.sae.buckets, "needs": list(needs),
            "version": [STUDY_VERSION, METRICS_VERSION]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cfg: Config, r: Run, what: str) -> Path:
    return run_dir(cfg.name) / "study" / r.config / r.variant / f"layer_{r.layer}" / f"seed_{r.seed}" / f"{what}.json"


def _cached(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())
    except ValueError:
        return None  # a file that is not what this module writes is recomputed (and replaced atomically)
    return row if row.get("key") == key else None


def _store(path: Path, row: dict) -> dict:
    """Cache `row` at `path` (atomically) and return it as a later read of the file will (keys sorted), so that
    a fresh and a cached evaluation give the same tables."""
    row = json.loads(json.dumps(_plain(row), sort_keys=True))
    write_json_atomic(path, row)
    return row


def _plain(obj: Any) -> Any:
    """JSON-ready: numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def evaluate_all(cfg: Config, runs: dict[Run, tuple[Point, tuple[str, ...]]], folders: dict[Run, Path],
                 jobs: int | None = None) -> dict[Run, dict]:
    """Each run's evaluation (`_evaluate_one`), from the cache where its key still matches, else computed in
    worker processes and cached; then the fidelity of the runs that need it (`fidelity_all`)."""
    from posae.data.store import open_layer_stores

    stores = open_layer_stores(cfg, "val", sorted({r.layer for r in runs}))
    out, todo = {}, []
    for r, (p, needs) in runs.items():
        key = eval_key(folders[r], stores[r.layer].meta.get("hash"), cfg, needs)
        row = _cached(cache_path(cfg, r, "evaluation"), key)
        if row is None:
            todo.append((r, (cfg, str(folders[r]), needs, key)))
        else:
            out[r] = row
    for (r, _), row in zip(todo, _pool_map(_evaluate_one, [a for _, a in todo], jobs)):
        out[r] = _store(cache_path(cfg, r, "evaluation"), row)
    fidelity = fidelity_all(cfg, {r: folders[r] for r, (_, needs) in runs.items() if "fidelity" in needs})
    for r, row in fidelity.items():
        out[r] = {**out[r], "fidelity": row}
    return out


_VAL: dict[tuple, Any] = {}  # per process: validation stores, probe tokens, raw accuracies, loaded once


def _val_cache(key: tuple, make):
    if key not in _VAL:
        _VAL[key] = make()
    return _VAL[key]


def _evaluate_one(arg: tuple[Config, str, tuple[str, ...], str]) -> dict:
    """One run's evaluation row (module level, so a worker process can run it): the validation metrics on the
    config's evaluation sample (`evaluate_run`), with `needs` the probes (`score_sae`, acc_raw beside) and, for
    the contrastive part, metrics and probes on each half of the validation sequences; its config.json's
    identity and gate start, its SAE's diagnostics at the end, its last training record."""
    import torch

    from posae import checkpoint
    from posae.data.store import open_layer_stores
    from posae.eval.metrics import eval_rows, evaluate_run
    from posae.eval.probes import probe_tokens, score_sae, tokens_from_arrays
    from posae.eval.probing import probe_sample, raw_accuracy

    cfg, folder, needs, key = arg
    folder = Path(folder)
    torch.set_num_threads(1)
    info = checkpoint.read_info(folder)
    layer, pc, buckets = info["layer"], cfg.probe, cfg.sae.buckets
    store = _val_cache(("store", cfg.stores_name, layer), lambda: open_layer_stores(cfg, "val", [layer])[layer])
    rows = _val_cache(("rows", store.path, pc), lambda: eval_rows(store, pc.eval_sequences, pc.seed))
    metrics = evaluate_run(folder, store, rows, buckets).metrics.iloc[0].to_dict()
    sae = checkpoint.load_sae(folder)
    row = {"key": key, "metrics": metrics, "ends": sae.diagnostics(),
           "info": {**{k: info.get(k) for k in ("variant", "layer", "seed", "steps", "diagnostics_start",
                                                "resampled_fraction", "train_seconds", "tokens_per_s")},
                    "l1_scale": info["config"]["train"]["l1_scale"]},
           "final": (checkpoint.read_metrics(folder) or [{}])[-1]}
    if "probes" in needs:
        tokens = _val_cache(("tokens", store.path, pc), lambda: probe_tokens(store, pc, buckets))
        raw = _val_cache(("raw", store.path, pc),
                         lambda: raw_accuracy(store, probe_sample(store, pc, buckets), pc))
        row["probes"] = {**score_sae(sae, tokens, buckets, pc), "acc_raw": raw}
    if "halves" in needs:
        seq_N, pos_N = np.asarray(store.seq_N), np.asarray(store.pos_N)
        row["halves"] = {}
        for half, ids in halves(seq_N).items():
            part_rows = _val_cache(("half", store.path, pc, half),
                                   lambda: half_rows(seq_N, ids, pc.eval_sequences, pc.seed))
            all_rows = np.flatnonzero(np.isin(seq_N, ids))
            tokens = _val_cache(("half-tokens", store.path, pc, half), lambda: tokens_from_arrays(
                store.normalised(all_rows).numpy(), pos_N[all_rows], seq_N[all_rows], store.seq_len, buckets, pc))
            row["halves"][half] = {"metrics": evaluate_run(folder, store, part_rows, buckets).metrics.iloc[0].to_dict(),
                                   "probes": score_sae(sae, tokens, buckets, pc), "sequences": int(len(ids))}
    return _plain(row)


def fidelity_all(cfg: Config, folders: dict[Run, Path]) -> dict[Run, dict]:
    """The CE-loss score and KL of each run (`posae.eval.fidelity.measure`, `summarise`), the model loaded once
    for all layers, on the config's fidelity sequences; cached per run like the evaluation."""
    from posae import checkpoint
    from posae.data import models
    from posae.data.store import open_layer_stores
    from posae.eval.fidelity import (fidelity_sequences, measure, model_tail, sae_replacement, summarise,
                                     token_ids, zero)

    if not folders:
        return {}
    stores = open_layer_stores(cfg, "val", sorted({r.layer for r in folders}))
    out, todo = {}, {}
    for r, folder in folders.items():
        key = eval_key(folder, stores[r.layer].meta.get("hash"), cfg, ("fidelity",))
        row = _cached(cache_path(cfg, r, "fidelity"), key)
        if row is None:
            todo[r] = key
        else:
            out[r] = row
    if not todo:
        return out
    dtype = stores[min(stores)].meta["forward_dtype"]
    loaded = models.load_model(dataclasses.replace(cfg.model, dtype=dtype))
    tail = model_tail(loaded.model)
    first = stores[min(stores)]
    seqs = fidelity_sequences(first, cfg.probe.fidelity_sequences, cfg.probe.seed)
    ids_SL, rows_SP = token_ids(first, seqs, loaded.tokenizer.bos_token_id)
    for layer in sorted({r.layer for r in todo}):
        here = [r for r in todo if r.layer == layer]
        replacements = {"zero": zero, **{r: sae_replacement(checkpoint.load_sae(folders[r], loaded.device),
                                                            stores[layer]) for r in here}}
        losses = measure(loaded, ids_SL, layer, replacements, cfg.capture.batch_size, store=stores[layer],
                         rows_SP=rows_SP, tail=tail)
        for r in here:
            pooled, _ = summarise(losses, r, "zero", first.seq_len, cfg.sae.buckets)
            out[r] = _store(cache_path(cfg, r, "fidelity"), {"key": todo[r], **pooled, "sequences": len(seqs)})
    return out


# --------------------------------------------------------------------------- the tables (pure)


def point_rows(points: list[Point], runs: dict[Point, Run], evaluations: dict[Run, dict]) -> pd.DataFrame:
    """One row per point: its settings, its run's validation metrics (val_metrics.csv's columns), probes
    (probes.csv's, where probed), fidelity (fidelity.csv's), gate start and end, budget and table movement."""
    rows = []
    for p in points:
        r = runs[p]
        ev = evaluations[r]
        info, final = ev["info"], ev["final"]
        row = {**p._asdict(), "overrides": ",".join(p.overrides), "config": r.config,
               "l1_effective": p.l1 * info["l1_scale"], **ev["metrics"]}
        row.update({f"probe/{k}": v for k, v in (ev.get("probes") or {}).items()})
        row.update({f"fidelity/{k}": v for k, v in (ev.get("fidelity") or {}).items() if k != "key"})
        row.update({"gate_start": (info.get("diagnostics_start") or {}).get("gate_mean", math.nan),
                    "gate_end": ev["ends"].get("gate_mean", math.nan),
                    "budget": final.get("budget/lr_sum", math.nan),
                    "gate_moved": final.get("tables/gate_logits/max_abs_change", math.nan),
                    "resampled_fraction": info.get("resampled_fraction", math.nan),
                    "train_seconds": info.get("train_seconds", math.nan)})
        for half, h in (ev.get("halves") or {}).items():
            row.update({f"{half}/{k}": v for k, v in {**h["metrics"], **h["probes"]}.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _strip(df: pd.DataFrame, prefix: str) -> pd.DataFrame:
    return df[[c for c in df if c.startswith(prefix)]].rename(columns=lambda c: c[len(prefix):])


def run_tables(df: pd.DataFrame, evaluations: dict[Run, dict] | None = None, runs: dict[Point, Run] | None = None,
               points: list[Point] | None = None):
    """`posae.report.tables.RunTables` of the rows `df` (one point per run): val_metrics, probes and fidelity
    frames in their files' columns, and the ablations (`posae.eval.ablations.ablation_runs`, `summarise`) from
    the runs' infos, diagnostics and last records when `evaluations` are given, else from the metrics alone."""
    from posae.eval.ablations import ablation_runs, summarise
    from posae.eval.fidelity import COLUMNS as FIDELITY_COLUMNS
    from posae.eval.probes import COLUMNS as PROBE_COLUMNS
    from posae.report.tables import RunTables

    ident = df[["variant", "layer", "seed"]]
    metric_cols = [c for c in df if c == "grouping" or c.split("/")[0] in ("val", "sparsity", "global", "position")]
    metrics = pd.concat([ident, df[metric_cols]], axis=1).reset_index(drop=True)
    probes = pd.concat([ident, _strip(df, "probe/")], axis=1)
    probes = probes.dropna(subset=["U_x"]).reset_index(drop=True) if "U_x" in probes else pd.DataFrame(
        columns=PROBE_COLUMNS)
    fidelity = pd.concat([ident, _strip(df, "fidelity/")], axis=1)
    fidelity = fidelity.dropna(subset=["ce_score"]).reset_index(drop=True) if "ce_score" in fidelity else \
        pd.DataFrame(columns=FIDELITY_COLUMNS)
    if evaluations is not None:
        evs = [evaluations[runs[p]] for p in points]
        infos = [e["info"] for e in evs]
        ab_runs = ablation_runs(metrics, infos, [e["ends"] for e in evs], [e["final"] for e in evs])
    else:
        ab_runs = ablation_runs(metrics, [], [], [])
    summary = summarise(ab_runs) if len(ab_runs) else pd.DataFrame(
        columns=["ablation", "variant", "mean", "std", "runs", "layers", "start", "budget", "moved"])
    empty = pd.DataFrame()
    return RunTables(metrics=metrics, by_position=empty, probes=probes, ablations=summary, ablation_runs=ab_runs,
                     training=empty, norms=empty, fidelity=fidelity)


# -- matched sparsity


def at_l0(l0_N: np.ndarray, y_N: np.ndarray, target: float) -> float:
    """`y` read off the frontier of points (L0, y) at L0 = `target`: linear interpolation in log L0 between the
    measured points (sorted by L0), NaN outside [min L0, max L0] (no extrapolation) or with fewer than two."""
    l0_N, y_N = np.asarray(l0_N, dtype=float), np.asarray(y_N, dtype=float)
    keep = np.isfinite(l0_N) & np.isfinite(y_N) & (l0_N > 0)
    l0_N, y_N = l0_N[keep], y_N[keep]
    if len(l0_N) < 2 or not np.isfinite(target) or target <= 0 or not l0_N.min() <= target <= l0_N.max():
        return math.nan
    order = np.argsort(l0_N, kind="stable")
    return float(np.interp(math.log(target), np.log(l0_N[order]), y_N[order]))


FRONTIER = {"val/explained_variance": "EV", "val/mse": "MSE", "fidelity/ce_score": "CE score"}


def frontier(df: pd.DataFrame) -> pd.DataFrame:
    """The sparsity part's points: variant, seed, train.l1, the λ1 it trains with (× l1_scale), L0, EV, MSE, CE
    score, dead fraction (high where λ1 is: a low-L0 point is partly dead features)."""
    s = df[df["part"] == "sparsity"]
    cols = ["variant", "seed", "l1", "l1_effective", "sparsity/l0", *[c for c in FRONTIER if c in s],
            "sparsity/dead_fraction"]
    return s[cols].sort_values(["variant", "l1"]).reset_index(drop=True)


def matched(front: pd.DataFrame, targets: list[float], base: str = BASELINE) -> pd.DataFrame:
    """Per variant and target L0: EV, MSE and CE score read off its frontier (`at_l0`), and the MSE over the
    baseline's at the same L0 (`mse_ratio`); NaN where either frontier does not reach the target."""
    rows = []
    for v, g in front.groupby("variant", sort=False):
        for t in targets:
            rows.append({"variant": v, "l0": t, **{FRONTIER[c]: at_l0(g["sparsity/l0"], g[c], t)
                                                  for c in FRONTIER if c in g}})
    out = pd.DataFrame(rows)
    ref = out[out["variant"] == base].set_index("l0")["MSE"]
    out["mse_ratio"] = out["MSE"] / out["l0"].map(ref)
    return out


def matched_metrics(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """The sparsity part's rows read off each variant's frontier at L0 = `target` (every metric and fidelity
    column by `at_l0`; sparsity/l0 = target): one row per variant and seed, as if each had been trained to that
    L0. What the matched-sparsity verdicts are computed on."""
    s = df[df["part"] == "sparsity"]
    numeric = [c for c in s if c.split("/")[0] in ("val", "sparsity", "global", "position", "fidelity")]
    rows = []
    for (v, seed), g in s.groupby(["variant", "seed"], sort=False):
        row = {"part": "matched", "variant": v, "layer": int(g["layer"].iloc[0]), "seed": seed,
               "grouping": g["grouping"].iloc[0]}
        row.update({c: at_l0(g["sparsity/l0"], g[c], target) for c in numeric})
        row["sparsity/l0"] = target if np.isfinite(row["val/mse"]) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# -- contrastive trade-off


def contrastive_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Per contrastive run and half: λ2, layer, seed, U_x, U (input kept), D_x − null (`excess`), MSE over the
    baseline's at the same layer, seed and half (`mse_ratio`), dead fraction, L0."""
    c = df[df["part"] == "contrastive"]
    rows = []
    for half in HALVES:
        base = c[c["variant"] == BASELINE].set_index(["layer", "seed"])[f"{half}/val/mse"]
        for row in c[c["variant"] == CONTRASTIVE].to_dict("records"):
            rows.append({"half": half, "layer": row["layer"], "seed": row["seed"], "lambda2": row["weight"],
                         "U_x": row[f"{half}/U_x"], "U": row[f"{half}/U"],
                         "excess": row[f"{half}/D_x"] - row[f"{half}/D_x_null"],
                         "mse_ratio": row[f"{half}/val/mse"] / base.get((row["layer"], row["seed"]), math.nan),
                         "dead_fraction": row[f"{half}/sparsity/dead_fraction"], "l0": row[f"{half}/sparsity/l0"]})
    return pd.DataFrame(rows)


def select_lambda2(scores: pd.DataFrame, max_mse_ratio: float, max_dead: float) -> float:
    """The λ2 chosen on the selection half only: among the λ2 whose mean MSE ratio (over layers and seeds) is at
    most `max_mse_ratio` and mean dead fraction at most `max_dead`, the one with the largest mean excess of D_x
    over its null (the smaller λ2 on a tie); NaN when none qualifies."""
    sel = scores[scores["half"] == "select"].groupby("lambda2")[["excess", "mse_ratio", "dead_fraction"]].mean()
    ok = sel[(sel["mse_ratio"] <= max_mse_ratio) & (sel["dead_fraction"] <= max_dead)]
    if ok.empty:
        return math.nan
    best = ok["excess"].max()
    return float(ok.index[ok["excess"] == best].min())


def summary_se(df: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    """Mean and standard error (std/√n over the rows of each group: seeds) of `columns`."""
    g = df.groupby(by, sort=True)[columns]
    out = g.mean().add_suffix("_mean").join(g.std().div(np.sqrt(g.count())).add_suffix("_se"))
    out["n"] = g.size()
    return out.reset_index()


# -- gate init


def gate_table(df: pd.DataFrame) -> pd.DataFrame:
    """The gate-init part per start and budget: start and end σ(G) (mean over seeds, end's se), Σ lr_t, the
    largest logit change, the range σ(start ± Σ lr_t) the run could reach (`posae.report.claims.reachable`)."""
    from posae.report.claims import reachable

    g = df[df["part"] == "gate_init"]
    out = g.groupby(["factor", "gate_init"], sort=True).agg(
        seeds=("seed", "nunique"), start=("gate_start", "mean"), end=("gate_end", "mean"),
        end_se=("gate_end", lambda x: x.std() / math.sqrt(len(x)) if len(x) > 1 else math.nan),
        budget=("budget", "mean"), moved=("gate_moved", "max")).reset_index()
    reach = [reachable(s, b) for s, b in zip(out["start"], out["budget"])]
    out["reach_low"], out["reach_high"] = [r[0] for r in reach], [r[1] for r in reach]
    return out


def gate_dependence(table: pd.DataFrame) -> pd.DataFrame:
    """Per budget: the spread of the end gates over the starts (max − min) against the spread of the starts;
    1 means the end is the start moved by a constant, 0 that every start ends at one value."""
    rows = []
    for f, g in table.groupby("factor"):
        spread_start = g["start"].max() - g["start"].min()
        spread_end = g["end"].max() - g["end"].min()
        rows.append({"factor": f, "start_spread": spread_start, "end_spread": spread_end,
                     "ratio": spread_end / spread_start if spread_start > 0 else math.nan,
                     "budget": g["budget"].mean(), "largest_move": g["moved"].max()})
    return pd.DataFrame(rows)


# -- verdicts


NOT_JUDGED_MATCHED = ("not judged at matched sparsity: the λ1 sweep has one seed per value and reads only "
                      "validation metrics off the frontiers (no probes, gates or resampling)")


def verdict_columns(df: pd.DataFrame, evaluations: dict[Run, dict], runs: dict[Point, Run], points: list[Point],
                    factors: tuple[int, ...], target_l0: float, reference=None) -> dict[str, pd.DataFrame]:
    """`posae.report.claims.claims` per column: the reference run as published (`reference`, RunTables, or
    None), the budget part at 1x and at the largest factor, and the sparsity part at L0 = `target_l0`."""
    from posae.report.claims import CANNOT, claims

    cols = {}
    if reference is not None:
        cols["default run"] = claims(reference)
    for f in (min(factors), max(factors)):
        idx = [i for i, p in enumerate(points) if p.part == "budget" and p.factor == f]
        sub = df.iloc[idx].reset_index(drop=True)
        cols[f"{f}x training"] = claims(run_tables(sub, evaluations, runs, [points[i] for i in idx]))
    m = claims(run_tables(matched_metrics(df, target_l0)))
    cannot = m["verdict"] == CANNOT
    m.loc[cannot, "reason"] = NOT_JUDGED_MATCHED + "; " + m.loc[cannot, "reason"]
    cols[f"matched L0 = {target_l0:.0f}"] = m
    return cols


def verdict_table(columns: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """claim × column: the verdict of each claim in each column (rows in claims.csv's order)."""
    first = next(iter(columns.values()))
    out = pd.DataFrame({"claim": first["claim"]})
    for name, c in columns.items():
        out[name] = out["claim"].map(dict(zip(c["claim"], c["verdict"])))
    return out


def verdicts_markdown(table: pd.DataFrame, columns: dict[str, pd.DataFrame], notes: list[str]) -> str:
    from posae.report.tables import markdown_table

    text = ["# Which verdicts survive longer training and matched sparsity", "",
            markdown_table(table.assign(**{c: table[c].map("**{}**".format) for c in table if c != "claim"})), ""]
    text += [f"- {n}" for n in notes]
    changed = table[table.drop(columns="claim").nunique(axis=1) > 1]
    if len(changed):
        text += ["", "## Where the columns disagree, each column's reason", ""]
        for claim in changed["claim"]:
            text.append(f"**{claim}**")
            text.append("")
            for name, c in columns.items():
                hit = c[c["claim"] == claim]
                if len(hit):
                    text.append(f"- *{name}*: {hit['verdict'].iloc[0]}: {hit['reason'].iloc[0]}")
            text.append("")
    return "\n".join(text) + "\n"


# --------------------------------------------------------------------------- the whole study


class Study(NamedTuple):
    cfg: Config
    grid: Grid
    points: list[Point]
    df: pd.DataFrame  # `point_rows`
    budget: pd.DataFrame  # Table 1 of the budget part, one block per factor
    frontier: pd.DataFrame
    matched: pd.DataFrame
    target_l0: float
    contrastive: pd.DataFrame  # `contrastive_scores`
    contrastive_summary: pd.DataFrame
    lambda2: float
    gate: pd.DataFrame
    gate_dependence: pd.DataFrame
    verdicts: pd.DataFrame
    verdict_columns: dict[str, pd.DataFrame]
    cost: pd.DataFrame  # estimated per part, and measured training seconds


MATCHED_L0S = (10.0, 20.0, 50.0, 100.0, 200.0)


def reference_tables(cfg: Config):
    """RunTables of the config the study derives from (its nearest base, else itself), or None where that
    run's tables are not there (run ``make reproduce`` first)."""
    from posae.report.tables import read_tables

    ref = load_config(cfg.bases[0], check_model=False) if cfg.bases else cfg
    try:
        return read_tables(ref)
    except (FileNotFoundError, OSError):
        return None


def run_study(cfg: Config, grid: Grid = Grid(), jobs: int | None = None, reference: bool = True) -> Study:
    """Capture what is not captured (the stores are the base config's: normally all there), train what is not
    trained, evaluate what is not evaluated, and compute every table of the study."""
    from posae.data.capture import capture
    from posae.report.tables import table1

    points = grid_points(cfg, grid)
    capture(cfg, progress=False)
    runs = distinct_runs(cfg, points)
    folders = train_all(cfg, points, jobs)
    evaluations = evaluate_all(cfg, runs, folders, jobs)
    point_run = {p: run_of(cfg, p) for p in points}
    df = point_rows(points, point_run, evaluations)

    blocks = []
    for f in grid.factors:
        idx = [i for i, p in enumerate(points) if p.part == "budget" and p.factor == f]
        t = table1(run_tables(df.iloc[idx].reset_index(drop=True), evaluations, point_run, [points[i] for i in idx]),
                   variants=grid.budget_variants)
        blocks.append(t.assign(factor=f, steps=f * cfg.train.steps))
    budget = pd.concat(blocks, ignore_index=True)

    front = frontier(df)
    one_x = df[(df["part"] == "budget") & (df["factor"] == 1) & (df["variant"] == BASELINE)]
    target = float(one_x["sparsity/l0"].mean()) if len(one_x) else float(np.median(front["sparsity/l0"]))
    match = matched(front, sorted({*MATCHED_L0S, round(target, 1)}))
    match["target"] = match["l0"] == round(target, 1)  # the row Table 1's matched-L0 column reads

    scores = contrastive_scores(df)
    lam = select_lambda2(scores, grid.max_mse_ratio, grid.max_dead) if len(scores) else math.nan
    summary = summary_se(scores, ["half", "layer", "lambda2"], ["U_x", "U", "excess", "mse_ratio", "dead_fraction",
                                                                "l0"]) if len(scores) else pd.DataFrame()
    gates = gate_table(df)
    cols = verdict_columns(df, evaluations, point_run, points, grid.factors, target,
                           reference_tables(cfg) if reference else None)
    spent = (df.drop_duplicates(["config", "variant", "layer", "seed"]).groupby("part")["train_seconds"].sum()
             .reindex(PARTS).rename("measured_train_s"))
    est = cost(cfg, points).set_index("part").join(spent)
    est.loc["total", "measured_train_s"] = spent.sum()
    return Study(cfg, grid, points, df, budget, front, match, target, scores, summary, lam, gates,
                 gate_dependence(gates), verdict_table(cols), cols, est.reset_index())


# --------------------------------------------------------------------------- figures and files


def _legend_below(fig, axes, ncol: int = 4):
    """One legend, from the first of `axes` that has one, under the panels (every other legend removed), so that
    it covers no data and the figure keeps the page's width (a legend beside the panels would widen the PNG)."""
    handles, labels = [], []
    for ax in axes:
        if ax.get_legend() is not None:
            if not labels:
                handles, labels = ax.get_legend_handles_labels()
            ax.get_legend().remove()
    fig.tight_layout()  # after the legends are gone: a legend inside a narrow panel would shrink the panels
    if labels:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), ncol),
                   fontsize=7, frameon=False)
    return fig


def _log_axis(ax, ticks=None) -> None:
    """A log x axis labelled with plain numbers (`ticks`, else matplotlib's major ticks), no minor labels."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    if ticks is not None:  # compact labels (300, 1.2k, 4.8k; 33 for 33.1) that do not run into each other
        values = sorted(set(float(t) for t in ticks))
        ax.set_xticks(values, [f"{v / 1000:g}k" if v >= 1000 else f"{v:.0f}" for v in values], fontsize=7)
    else:  # 1 and 3 per decade: labels that fit a third of the page, even on a frontier under a decade wide
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.tick_params(axis="x", labelsize=7)
    ax.xaxis.set_minor_formatter(NullFormatter())


def _variant_palette(variants) -> dict:
    """One colour per variant in the tables' order, the baseline black: eleven lines stay told apart."""
    import seaborn as sns

    from posae.report.tables import ordered_variants

    names = ordered_variants(set(variants))
    others = [v for v in names if v != BASELINE]
    colours = dict(zip(others, sns.color_palette("tab20", 20)[::2] + sns.color_palette("tab20", 20)[1::2]))
    return {v: (0.0, 0.0, 0.0) if v == BASELINE else colours[v] for v in names}


def _median_and_range(ax, df: pd.DataFrame, x: str, y: str, hue: str, palette: dict | None = None) -> None:
    """Per `hue`, the median over the rows at each `x` (seeds) as a line, their range as a band: every quantity
    drawn here is one that cannot go below zero, so no mean ± std (the house style of `posae.report.plots`)."""
    import seaborn as sns

    sns.lineplot(data=df, x=x, y=y, hue=hue, estimator="median", errorbar=("pi", 100), marker="o", ax=ax,
                 palette=palette, hue_order=list(palette) if palette else None)


def _budget_figure(study: Study):
    import matplotlib.pyplot as plt

    from posae.report.plots import PAGE_WIDTH_IN

    b = study.df[study.df["part"] == "budget"].copy()
    base = b[b["variant"] == BASELINE].set_index(["factor", "seed"])["val/mse"]
    b["mse_ratio"] = b["val/mse"].to_numpy() / base.reindex(list(zip(b["factor"], b["seed"]))).to_numpy()
    b["steps"] = b["factor"] * study.cfg.train.steps
    panels = [("val/explained_variance", "explained variance"), ("mse_ratio", "MSE / baseline's"),
              ("probe/U_x", "U_x (position input shuffled)"), ("probe/U", "U (position input kept)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH_IN, 2.6), sharex=True)
    for ax, (col, label) in zip(axes, panels):
        _median_and_range(ax, b, "steps", col, "variant", _variant_palette(b["variant"]))
        _log_axis(ax, b["steps"])
        ax.set(xlabel="optimizer steps", ylabel="", title=label)
        ax.title.set_fontsize(8)
        if col.startswith("probe/"):  # U and U_x start at 0
            ax.set_ylim(bottom=0)
    return _legend_below(fig, axes)


def _frontier_figure(study: Study):
    import matplotlib.pyplot as plt
    import seaborn as sns

    from posae.report.plots import PAGE_WIDTH_IN

    f = study.frontier
    panels = [c for c in ("val/explained_variance", "fidelity/ce_score") if c in f]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(PAGE_WIDTH_IN, 2.8))
    palette = _variant_palette(f["variant"])
    for ax, col in zip(axes, panels):
        sns.lineplot(data=f, x="sparsity/l0", y=col, hue="variant", marker="o", ax=ax, sort=True, estimator=None,
                     palette=palette, hue_order=list(palette), markersize=4)
        ax.axvline(study.target_l0, color="grey", ls="--", lw=1)
        _log_axis(ax)
        ax.set(xlabel="L0, active features per token", ylabel=FRONTIER[col], title=f"{FRONTIER[col]}–L0")
        ax.xaxis.label.set_fontsize(8)
    m = study.matched.dropna(subset=["mse_ratio"])
    sns.lineplot(data=m, x="l0", y="mse_ratio", hue="variant", marker="o", ax=axes[-1], legend=False,
                 palette=palette, hue_order=[v for v in palette if v in set(m["variant"])], markersize=4)
    axes[-1].axhline(1.0, color="grey", ls="--", lw=1)
    _log_axis(axes[-1], m["l0"] if len(m) else None)
    axes[-1].set(xlabel="matched L0", ylabel="MSE / baseline's at that L0", title="matched sparsity")
    return _legend_below(fig, axes)


def _contrastive_figure(study: Study):
    import matplotlib.pyplot as plt

    from posae.report.plots import PAGE_WIDTH_IN, layer_label, layer_palette

    s = study.contrastive[study.contrastive["half"] == "report"]
    s = s.assign(layer=s["layer"].map(layer_label))
    panels = [("U_x", "U_x"), ("U", "U, input kept"), ("mse_ratio", "MSE / baseline's"),
              ("dead_fraction", "dead fraction")]
    fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH_IN, 2.6), sharex=True)
    lams = sorted(set(s["lambda2"]))
    for ax, (col, label) in zip(axes, panels):
        _median_and_range(ax, s, "lambda2", col, "layer", layer_palette(s["layer"]))
        if np.isfinite(study.lambda2):
            ax.axvline(study.lambda2, color="tab:red", ls=":", lw=1)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xticks(lams, [f"{v:g}" for v in lams], fontsize=7)
        ax.set(xlabel="λ2", ylabel="", title=label)
        ax.title.set_fontsize(8)
        if col != "mse_ratio":  # scores and shares start at 0
            ax.set_ylim(bottom=0)
    return _legend_below(fig, axes)


def _gate_figure(study: Study):
    import matplotlib.pyplot as plt
    import seaborn as sns

    from posae.report.plots import PAGE_WIDTH_IN

    g = study.df[study.df["part"] == "gate_init"]
    g = g.assign(budget_label=[f"{f}x ({f * study.cfg.train.steps} steps)" for f in g["factor"]])
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN * 0.6, 2.8))
    ax.axhspan(0.09, 0.15, color="tab:red", alpha=0.1, label="paper: 0.12 ± 0.03")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="end = start")
    sns.lineplot(data=g, x="gate_start", y="gate_end", hue="budget_label", estimator="median", errorbar=None,
                 ax=ax)
    sns.scatterplot(data=g, x="gate_start", y="gate_end", hue="budget_label", ax=ax, legend=False, s=18)
    for f, sub in study.gate.groupby("factor"):
        ax.vlines(sub["start"], sub["reach_low"], sub["reach_high"], color="grey", lw=4, alpha=0.25)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="gate σ(G) at the start", ylabel="gate σ(G) at the end (runs, median)",
           title="grey: σ(start ± Σ lr_t), what a run can reach")
    ax.title.set_fontsize(8)
    return _legend_below(fig, [ax], ncol=2)


FIGURES = {"budget": _budget_figure, "frontier": _frontier_figure, "contrastive": _contrastive_figure,
           "gate_init": _gate_figure}


def figure(study: Study, name: str):
    """Draw one of `FIGURES`."""
    return FIGURES[name](study)


def notes(study: Study) -> list[str]:
    """What the reader of verdicts.md must know, with the numbers of this run."""
    layer = study_layer(study.cfg, study.grid)
    seeds = study.grid.budget_seeds
    return [
        "Verdicts by `posae.report.claims.claims` (the tests its rows name) on tables built from the study's runs.",
        "*default run*: the published run of the config the study derives from (every variant, every layer)."
        if "default run" in study.verdict_columns else "*default run*: not available (its tables are missing: run "
                                                       "`make reproduce` first).",
        f"*1x / {max(study.grid.factors)}x training*: layer {layer}, the {len(study.grid.budget_variants)} budget "
        f"variants, {seeds} seeds each. A claim over a variant outside them says 'not measured' there; the "
        "position-weighting pair (hierarchical_unweighted) is not in the budget part. With two runs the t-tests "
        "have one degree of freedom: 'holds' for U = 0 there means 'not shown above the null', at low power.",
        f"*matched L0*: every variant's λ1 sweep (one seed) read off its frontier at L0 = {study.target_l0:.1f}, the "
        f"1x baseline's L0 on layer {layer} (linear interpolation in log L0 between measured points, no "
        "extrapolation). A single run per variant makes each confidence interval a point.",
        f"Shrunk to fit the 45-minute cap (docs/study.md): {len(study.grid.l1_factors)} λ1 values; the gate-init "
        f"part's seeds per budget {dict(zip(study.grid.gate_factors, study.grid.gate_seeds))} (its 0.5 start is the "
        f"budget part's run, {study.grid.budget_seeds} seeds).",
    ]


def write_outputs(study: Study, out: Path | None = None) -> list[Path]:
    """Every CSV, figure (PNG and PDF, at most the page's 7 in) and verdicts.md under figures/<study>/."""
    import matplotlib.pyplot as plt

    from posae.report.plots import save
    from posae.report.tables import STUDY_JSON

    out = figures_dir(study.cfg.name) if out is None else Path(out)
    tables = {"points.csv": study.df, "budget.csv": study.budget, "frontier.csv": study.frontier,
              "matched.csv": study.matched, "contrastive.csv": study.contrastive,
              "contrastive_summary.csv": study.contrastive_summary, "gate_init.csv": study.gate,
              "gate_dependence.csv": study.gate_dependence, "cost.csv": study.cost}
    written = []
    for name, df in tables.items():
        write_csv_atomic(df, out / name)
        written.append(out / name)
    long = pd.concat([c.assign(column=n) for n, c in study.verdict_columns.items()], ignore_index=True)
    write_csv_atomic(long[["column", "claim", "verdict", "reason", "test", "ours"]], out / "verdicts.csv")
    write_text_atomic(out / "verdicts.md", verdicts_markdown(study.verdicts, study.verdict_columns, notes(study)))
    written += [out / "verdicts.csv", out / "verdicts.md"]
    # What the default run's Table 1 needs to find this study (`posae.report.tables.study_matched`).
    write_json_atomic(out / STUDY_JSON, {"stores": study.cfg.stores_name, "layer": study_layer(study.cfg, study.grid),
                                         "target_l0": round(study.target_l0, 1)})
    written.append(out / STUDY_JSON)
    for name in FIGURES:
        fig = figure(study, name)
        save(fig, out / name)
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


# --------------------------------------------------------------------------- command line: make study


NOTEBOOK = "08_study.ipynb"


def progress_counts(cfg: Config, grid: Grid = Grid()) -> tuple[int, int, int]:
    """(runs trained, runs evaluated, distinct runs) as the files on disk say now: what the heartbeat of
    `make study` prints while notebook 08 runs in its kernel. Reads each run's config.json only (no hashing)."""
    runs = distinct_runs(cfg, grid_points(cfg, grid))
    trained = evaluated = 0
    for r in runs:
        try:
            trained += bool(json.loads((sae_dir(r.config, r.variant, r.layer, r.seed) / "config.json")
                                       .read_text()).get("done"))
        except (OSError, ValueError):
            pass
        evaluated += cache_path(cfg, r, "evaluation").exists()
    return trained, evaluated, len(runs)


@contextlib.contextmanager
def heartbeat(cfg: Config, grid: Grid, every: float = 60.0) -> Iterator[None]:
    """One terminal line every `every` seconds while the body runs, when the counts have moved:
    'study: 41/124 runs trained, 0/124 evaluated (12.0 min)'. The notebook's own output goes to its file."""
    import threading

    stop, start = threading.Event(), time.perf_counter()

    def beat() -> None:
        last = None
        while not stop.wait(every):
            counts = progress_counts(cfg, grid)
            if counts != last:
                trained, evaluated, n = counts
                print(f"study: {trained}/{n} runs trained, {evaluated}/{n} evaluated "
                      f"({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
                last = counts

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def main(argv: list[str] | None = None) -> int:
    """``python -m posae.study --config study``: notebook 08 through papermill (as the driver runs a stage), its
    HTML render beside the figures (figures/<config>/notebooks/); ``--plan``: the grid's counts and estimated time,
    nothing run; ``--sample``: the small grid. One driver per config at a time (the driver's lock)."""
    from posae.__main__ import known_error

    parser = argparse.ArgumentParser(prog="python -m posae.study", description=main.__doc__.split("\n")[0])
    parser.add_argument("--config", default="study", help="name under params/ or a YAML path (default: study)")
    parser.add_argument("--plan", action="store_true", help="print the grid's run counts and the time estimate")
    parser.add_argument("--sample", action="store_true", help="the small grid (posae.study.SAMPLE), for a smoke config")
    parser.add_argument("--jobs", type=int, default=0, help="processes side by side (default 0: one per core)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, check_model=not args.plan)
        if args.plan:
            print(cost(cfg, grid_points(cfg, SAMPLE if args.sample else Grid())).round(1).to_string(index=False))
            return 0
        from posae.pipeline.driver import driver_lock, execute, publish_renders
        from posae.pipeline.stages import Stage, config_parameter

        start, grid = time.perf_counter(), SAMPLE if args.sample else Grid()
        est = cost(cfg, grid_points(cfg, grid))
        with driver_lock(cfg, args.config):
            trained, _, n = progress_counts(cfg, grid)
            print(f"study: running notebook 08 on {n} runs ({trained} already trained; about "
                  f"{float(est['wall_min'].iloc[-1]):.0f} min on 2 cores from none); a line a minute until it ends", flush=True)
            with heartbeat(cfg, grid):
                execute(cfg, Stage("study", NOTEBOOK, {"config": config_parameter(cfg), "sample": args.sample,
                                                       "jobs": args.jobs}))
            publish_renders(cfg)
        print(f"study: {figures_dir(cfg.name)} written in {(time.perf_counter() - start) / 60:.1f} min")
        return 0
    except Exception as e:
        known = known_error(e)
        if known is None:
            raise
        print(f"error: {known[0]}", file=sys.stderr)
        return known[1]


if __name__ == "__main__":
    sys.exit(main())
