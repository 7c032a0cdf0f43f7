"""A planted ground truth: synthetic activations where the answer is known (notebook 00).

Several variants feed the token's position into the SAE (position embeddings, masks, gates), so a
probe on their position group can read position from that input rather than from the activation.
Here every variant is trained, through the ordinary training path, on data whose position content
is known, and every score is checked against controls that must come out one way.

What is planted, at the config's width d and positions 1..L−1 (BOS excluded, as in the real stores),
on mutually orthogonal unit directions (numbers for the default d = 640, L = 128, 8 buckets):

- **global features** (d/4 = 160): fire independently of position, each at its own rate (log-spaced
  from 8% to 2%: 6.9 active per token), with magnitudes uniform in [0.5, 1.5];
- **a position code written into x**: `buckets` directions whose coefficients are a deterministic
  function of t, 0.5·√2·cos(πjs) with s = (t − ½)/(L − 1), j = 1..buckets, strong enough that a
  linear probe on x reads the position bucket (0.99);
- **position-dependent features** (4 per bucket, 32): each fires only in its own bucket, at 25%;
- isotropic Gaussian noise, std 0.04 per dimension (a tenth of the variance).

Sized so that the default training budget learns it: with d/2 global features at 4% to 1% the
baseline reached EV 0.41 in the default 300 steps (0.88 in 1,000); with these, 0.85. Training
sequences are the corpus's (1000 × 127 tokens, as in the real store); validation sequences are what
the probes' sample needs, 2 × `PROBE_TOKENS`/(L − 1), at most the corpus's.

The **control** data set has the same global features and noise and no position structure at all:
no code, and the position-dependent directions fire at their average rate (25%/buckets) everywhere.

Two reference SAEs are not trained. The **echo** control's position group is the one-hot of the
*fed* position's bucket (a function of the position input alone); the **oracle** reads the planted
code out of x. Both share a global group that detects the planted global features in x with the
code projected out. What each must show:

- echo: the old U (position inputs kept) high, the new U_x (position inputs shuffled) ≈ 0: the old
  score credits an SAE that echoes its input, the new one does not;
- oracle: U and U_x both ≈ 1 and acc_position ≈ 1: the probes find position where x carries it;
- a probe on raw x: ≥ 0.95 on the planted data, chance on the control;
- on the control data every variant's D_x within the noise of its null: what x does not carry, no
  SAE can be credited with.

Products go to ``runs/<config>/ground_truth/``: per data set its stores (``<data>/train``,
``<data>/val``) and one run folder per variant (``<data>/saes/<variant>``), trained by
`posae.train.train_run` (so resumed, locked and digested like every run), and `GROUND_TRUTH_CSV`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from posae import checkpoint
from posae.checkpoint import load_sae
from posae.config import Config, ProbeConfig
from posae.data import models
from posae.data.store import ActivationStore, StoreWriter, is_complete
from posae.eval.metrics import accumulate, reconstruction_metrics, sparsity_metrics
from posae.eval.probes import score_sae, tokens_from_arrays
from posae.eval.probing import fit_probe
from posae.paths import lock_path, locked, run_dir, write_csv_atomic
from posae.pool import spawn_pool
from posae.saes import REGISTRY, variant_config
from posae.saes.buckets import position_bucket
from posae.train import train_run

GROUND_TRUTH_CSV = "ground_truth.csv"
DATASETS = ("planted", "control")
REFERENCES = ("echo", "oracle")
GENERATOR_VERSION = 1
_CHUNK = 128  # sequences generated (and appended to a store) at a time


# --------------------------------------------------------------------------- what is planted


@dataclass(frozen=True)
class Design:
    """The sizes and rates of the planted data; `design(cfg)` sizes it from a config."""

    d_model: int
    seq_len: int
    buckets: int
    train_sequences: int
    val_sequences: int
    n_global: int
    per_bucket: int = 4  # position-dependent features per bucket
    global_rates: tuple[float, float] = (0.08, 0.02)  # log-spaced from the first to the last global feature
    position_rate: float = 0.25  # a position-dependent feature's rate inside its bucket (0 outside)
    code_amplitude: float = 0.5  # RMS of each code coefficient over positions
    magnitudes: tuple[float, float] = (0.5, 1.5)  # uniform
    noise_std: float = 0.04
    seed: int = 0

    @property
    def n_position(self) -> int:
        return self.per_bucket * self.buckets

    @property
    def n_code(self) -> int:
        return self.buckets

    def key(self, data: str, split: str) -> str:
        """Content hash of one store: the design, which data set and split, the generator version."""
        blob = {"design": dataclasses.asdict(self), "data": data, "split": split, "version": GENERATOR_VERSION}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# The planted answers are far from the thresholds (echo U_x 0.003 against ≤ 0.05, oracle 1.0 against ≥ 0.9,
# measured with 16,000 tokens), so the probes here take half the real ones' tokens: it halves the probes'
# cost (~55 core-seconds at the default width) for noise bounds 1.4× wider, computed from the tokens used.
PROBE_TOKENS = 8000


def probe_config(cfg: Config) -> ProbeConfig:
    """The config's probes, on at most `PROBE_TOKENS` tokens."""
    return dataclasses.replace(cfg.probe, tokens=min(cfg.probe.tokens, PROBE_TOKENS))


def design(cfg: Config) -> Design:
    """The planted data for `cfg`: its model's width, its context and buckets, its corpus's training
    sequences, and validation sequences enough for the probes' subsample (at most the corpus's)."""
    d = models.describe(cfg.model, cfg.source).hidden_size
    L = cfg.corpus.seq_len
    val = min(cfg.corpus.n_val, max(2, math.ceil(2 * probe_config(cfg).tokens / (L - 1))))
    return Design(d_model=d, seq_len=L, buckets=cfg.sae.buckets, train_sequences=cfg.corpus.n_train,
                  val_sequences=val, n_global=d // 4, seed=cfg.corpus.seed)


class Planted(NamedTuple):
    """The planted directions (unit rows, mutually orthogonal) and what drives them."""

    global_GD: np.ndarray
    position_PD: np.ndarray
    code_CD: np.ndarray
    global_rate_G: np.ndarray
    position_bucket_P: np.ndarray  # the bucket each position-dependent feature lives in
    code_TC: np.ndarray  # code coefficients at each position t in [0, L) (row 0, BOS, unused)


def planted(ds: Design) -> Planted:
    """The directions and rates of `ds`, a pure function of it."""
    G, P, C, D = ds.n_global, ds.n_position, ds.n_code, ds.d_model
    if G + P + C > D:
        raise ValueError(f"planted data: {G} global + {P} position + {C} code directions exceed d = {D}. "
                         "Fix: raise the model width or lower sae.buckets")
    rng = np.random.default_rng([ds.seed, 0])
    Q_DM, _ = np.linalg.qr(rng.standard_normal((D, G + P + C)))
    dirs_MD = Q_DM.T.astype(np.float32)
    s_T = (np.arange(ds.seq_len) - 0.5) / (ds.seq_len - 1)
    code_TC = ds.code_amplitude * math.sqrt(2) * np.cos(np.pi * np.outer(s_T, np.arange(1, C + 1)))
    return Planted(dirs_MD[:G], dirs_MD[G:G + P], dirs_MD[G + P:],
                   np.geomspace(*ds.global_rates, G), np.arange(P) % ds.buckets, code_TC.astype(np.float32))


def generate(ds: Design, data: str, split: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(x_ND raw activations, pos_N, seq_N) of one store, `_CHUNK` sequences at a time; seeded per chunk."""
    if data not in DATASETS:
        raise ValueError(f"unknown data set {data!r}. Fix: use one of {', '.join(DATASETS)}")
    p = planted(ds)
    n_seq = ds.train_sequences if split == "train" else ds.val_sequences
    T = ds.seq_len - 1
    for first in range(0, n_seq, _CHUNK):
        S = min(_CHUNK, n_seq - first)
        rng = np.random.default_rng([ds.seed, 1, DATASETS.index(data), ("train", "val").index(split), first])
        pos_N = np.tile(np.arange(1, ds.seq_len, dtype=np.int32), S)
        seq_N = np.repeat(np.arange(first, first + S, dtype=np.int32), T)
        if data == "planted":
            rate_NP = np.where(position_bucket(pos_N, ds.seq_len, ds.buckets)[:, None] == p.position_bucket_P,
                               ds.position_rate, 0.0)
        else:
            rate_NP = np.full((len(pos_N), ds.n_position), ds.position_rate / ds.buckets)
        x_ND = _fire(rng, np.broadcast_to(p.global_rate_G, (len(pos_N), ds.n_global)), ds) @ p.global_GD
        x_ND += _fire(rng, rate_NP, ds) @ p.position_PD
        if data == "planted":
            x_ND += p.code_TC[pos_N] @ p.code_CD
        x_ND += ds.noise_std * rng.standard_normal(x_ND.shape, dtype=np.float32)
        yield x_ND, pos_N, seq_N


def _fire(rng: np.random.Generator, rate_NF: np.ndarray, ds: Design) -> np.ndarray:
    """Feature magnitudes: each fires with its rate, uniform in `ds.magnitudes` when it does (one draw
    decides both: below the rate, u / rate is itself uniform)."""
    u_NF = rng.random(rate_NF.shape, dtype=np.float32)
    fire_NF = u_NF < rate_NF
    lo, hi = ds.magnitudes
    m_NF = np.zeros_like(u_NF)
    np.divide(u_NF, rate_NF, out=m_NF, where=fire_NF)
    return np.where(fire_NF, np.float32(lo) + np.float32(hi - lo) * m_NF, np.float32(0.0))


def ground_truth_dir(cfg: Config) -> Path:
    return run_dir(cfg.name) / "ground_truth"


def store_path(cfg: Config, data: str, split: str) -> Path:
    return ground_truth_dir(cfg) / data / split


def write_stores(cfg: Config, ds: Design, data: str) -> dict[str, ActivationStore]:
    """The training and validation stores of one data set, written unless complete with this design's hash."""
    stores: dict[str, ActivationStore] = {}
    for split in ("train", "val"):
        path, key = store_path(cfg, data, split), ds.key(data, split)
        with locked(lock_path(path, "write"), f"writing the {data} {split} store"):
            if not is_complete(path, key):
                n_seq = ds.train_sequences if split == "train" else ds.val_sequences
                meta = {"seq_len": ds.seq_len, "split": split, "layer": 0, "hash": key, "synthetic": data,
                        "design": dataclasses.asdict(ds), "n_sequences": n_seq}
                with StoreWriter(path, n_seq * (ds.seq_len - 1), ds.d_model, meta,
                                 stats_from=stores.get("train")) as w:
                    for x_ND, pos_N, seq_N in generate(ds, data, split):
                        w.append(x_ND, np.zeros_like(pos_N), pos_N, seq_N)
            stores[split] = ActivationStore.open(path, key)
    return stores


# --------------------------------------------------------------------------- the reference SAEs


class _Reference:
    """What the probes need of an SAE (`encode`, `groups`, `probe_groups`, `k`), computed, not trained.

    The global group detects each planted global feature in x with the code projected out:
    ReLU(g · (x − U Uᵀ x) − 5σ) on the raw scale (σ the noise std), a fixed function of x."""

    def __init__(self, p: Planted, ds: Design, store: ActivationStore, n_position: int):
        self.ds = ds
        self.mean_D = torch.from_numpy(np.asarray(store.mean_D, dtype=np.float32))
        self.scale = store.scale
        self.global_GD, self.code_CD = torch.from_numpy(p.global_GD), torch.from_numpy(p.code_CD)
        self.n_global = len(p.global_GD)
        self.k = self.n_global + n_position
        self.W_dec_KD = torch.zeros(self.k, ds.d_model)  # only its device is read (`encode_array`)

    @property
    def groups(self) -> dict[str, range]:
        return {"global": range(0, self.n_global), "position": range(self.n_global, self.k)}

    def probe_groups(self) -> dict[str, range]:
        return self.groups

    def raw(self, x_BD: Tensor) -> Tensor:
        return x_BD.float() / self.scale + self.mean_D

    def global_features(self, raw_BD: Tensor) -> Tensor:
        c_BC = raw_BD @ self.code_CD.T
        return torch.relu((raw_BD - c_BC @ self.code_CD) @ self.global_GD.T - 5 * self.ds.noise_std)

    def bucket_onehot(self, pos_B: Tensor) -> Tensor:
        b_B = torch.from_numpy(position_bucket(pos_B.cpu().numpy(), self.ds.seq_len, self.ds.buckets))
        return torch.nn.functional.one_hot(b_B, self.ds.buckets).float()


class Echo(_Reference):
    """The position group is the one-hot of the fed position's bucket: it echoes the position input."""

    def __init__(self, p: Planted, ds: Design, store: ActivationStore):
        super().__init__(p, ds, store, ds.buckets)

    def encode(self, x_BD: Tensor, pos_B: Tensor) -> Tensor:
        return torch.cat([self.global_features(self.raw(x_BD)), self.bucket_onehot(pos_B)], 1)


class Oracle(_Reference):
    """The position group reads the planted code out of x: ReLU(±Uᵀx), and the one-hot of the bucket of
    the position whose code is nearest to Uᵀx. The position input is ignored."""

    def __init__(self, p: Planted, ds: Design, store: ActivationStore):
        super().__init__(p, ds, store, 2 * ds.n_code + ds.buckets)
        self.code_TC = torch.from_numpy(p.code_TC)

    def encode(self, x_BD: Tensor, pos_B: Tensor) -> Tensor:
        raw_BD = self.raw(x_BD)
        c_BC = raw_BD @ self.code_CD.T
        nearest_B = torch.cdist(c_BC, self.code_TC[1:]).argmin(1) + 1  # positions 1..L−1
        return torch.cat([self.global_features(raw_BD), torch.relu(c_BC), torch.relu(-c_BC),
                          self.bucket_onehot(nearest_B)], 1)


# --------------------------------------------------------------------------- training and scoring


def run_path(cfg: Config, data: str, variant: str) -> Path:
    return ground_truth_dir(cfg) / data / "saes" / variant


def run_folders(cfg: Config) -> list[Path]:
    """Every run folder the ground truth trains: each registered variant on each data set."""
    return [run_path(cfg, data, v) for data in DATASETS for v in sorted(REGISTRY)]


def cores() -> int:
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def one_thread_each() -> Iterator[None]:
    """torch on one thread inside: work goes side by side in threads, each single-threaded (and so
    deterministic whatever runs beside it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_all(cfg: Config, stores: dict[str, dict[str, ActivationStore]],
              jobs: int | None = None) -> dict[tuple[str, str], Path]:
    """Train every registered variant on each data set's training store, seed = the variant's first, `jobs`
    runs (default: one per core) side by side in worker processes of one thread each, as the driver runs
    training notebooks (threads of one process would share its interpreter lock: measured 3 min 20 s for
    the notebook against ~1 min 40 s expected from the runs' own time); finished runs are skipped.
    Returns (data set, variant) -> run folder."""
    todo = [(data, v) for data in DATASETS for v in sorted(REGISTRY)]
    args = [(cfg, v, str(stores[data]["train"].path), str(run_path(cfg, data, v))) for data, v in todo]
    workers = max(1, min(jobs or cores(), len(args)))
    if workers == 1:
        return dict(zip(todo, (Path(_train_one(a)) for a in args)))
    with spawn_pool(workers) as pool:
        return dict(zip(todo, (Path(p) for p in pool.map(_train_one, args))))


def _train_one(arg: tuple[Config, str, str, str]) -> str:
    """One planted run, in a worker process (module level, so that it pickles)."""
    cfg, variant, store_path, out = arg
    torch.set_num_threads(1)
    vcfg = variant_config(cfg, variant)
    store = ActivationStore.open(store_path)
    return str(train_run(vcfg, variant, 0, vcfg.train.seeds[0], store, progress=False, out=Path(out),
                         device=models.resolve_device(cfg.model.device)))


def recovery(W_dec_KD: Tensor, dirs_MD: np.ndarray) -> float:
    """Mean over the planted directions of the largest |cosine| to any decoder row (1: each one is a row)."""
    W_KD = torch.nn.functional.normalize(W_dec_KD.detach().float().cpu(), dim=1)
    return float((torch.from_numpy(dirs_MD) @ W_KD.T).abs().amax(1).mean())


def val_arrays(store: ActivationStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_ND normalised, pos_N, seq_N) of a whole validation store."""
    return store.normalised(np.arange(len(store))).numpy(), np.asarray(store.pos_N), np.asarray(store.seq_N)


def evaluate(cfg: Config, ds: Design, stores: dict[str, dict[str, ActivationStore]],
             folders: dict[tuple[str, str], Path]) -> pd.DataFrame:
    """One row per data set and SAE: the trained runs of `folders` ((data set, variant) -> run folder), then
    the two references, each scored by `score_one`; in this process, one after another (`ground_truth`
    trains and scores in worker processes)."""
    items = [(data, name) for data in DATASETS for name in (*sorted(v for d, v in folders if d == data), *REFERENCES)]
    with one_thread_each():
        return pd.DataFrame([score_one(cfg, ds, stores[data], data, name, folders.get((data, name)))
                             for data, name in items])


_SCORING: dict[tuple, Any] = {}  # per process: each data set's probe tokens and raw-x accuracy, built once


def score_one(cfg: Config, ds: Design, stores: dict[str, ActivationStore], data: str, name: str,
              folder: Path | None) -> dict[str, object]:
    """The row of one SAE on one data set: a reference (`REFERENCES`, built here) or the trained run in
    `folder`, with its recovery of the planted directions, explained variance and L0 on the validation
    store, every probe column of `posae.eval.probes.score_sae` (`probe_config`) and the raw-x probe."""
    p, pc, val = planted(ds), probe_config(cfg), stores["val"]
    key = (ds, data, pc)
    if key not in _SCORING:
        t = tokens_from_arrays(*val_arrays(val), ds.seq_len, ds.buckets, pc)
        _SCORING[key] = t, fit_probe(t.x_train_ND, t.y_train_N, t.x_test_ND, t.y_test_N, pc.C, pc.max_iter,
                                     pc.seed).accuracy
    tokens, raw = _SCORING[key]
    if name in REFERENCES:
        sae = {"echo": Echo, "oracle": Oracle}[name](p, ds, val)
        row: dict[str, object] = {"kind": "reference", "seed": None}
    else:
        sae = load_sae(folder, models.resolve_device(cfg.model.device))
        s = accumulate(sae, val, np.arange(len(val)))
        sparsity = sparsity_metrics(s)
        row = {"kind": "trained", "seed": checkpoint.read_info(folder)["seed"],
               "recovery_global": recovery(sae.W_dec_KD, p.global_GD),
               "recovery_position": recovery(sae.W_dec_KD, p.position_PD),
               "recovery_code": recovery(sae.W_dec_KD, p.code_CD),
               "explained_variance": reconstruction_metrics(s)["val/explained_variance"],
               "l0": sparsity["sparsity/l0"], "dead_fraction": sparsity["sparsity/dead_fraction"]}
    return {"data": data, "variant": name, **row, **score_sae(sae, tokens, ds.buckets, pc), "acc_raw": raw}


# The longest runs first, so that two workers end together (train seconds measured at the default width:
# contrastive 8.5, multiscale 7.0, the hierarchical pair 6.8, attention routing 6.5, the rest 4-5).
LONGEST_FIRST = ("contrastive", "multiscale", "hierarchical", "hierarchical_unweighted", "attention_routing")


def ground_truth(cfg: Config, jobs: int | None = None) -> pd.DataFrame:
    """Write the stores, train every variant on both data sets, score them and the two references; writes
    runs/<config>/ground_truth/ground_truth.csv atomically and returns its table (rows as `evaluate`'s).

    Each SAE is one task for `jobs` worker processes (default: one per core) of one thread each: write its
    data set's stores unless complete (the first task of each data set writes them, the others find them),
    train it unless finished, score it. Processes, not threads: training loops and lbfgs both hold the
    interpreter lock between their kernels. Every task is single-threaded, so the table does not depend on
    `jobs`."""
    ds = design(cfg)
    trained = [(data, v) for data in DATASETS for v in sorted(REGISTRY)]
    items = [(data, name) for data in DATASETS for name in (*sorted(REGISTRY), *REFERENCES)]
    rank = {v: i for i, v in enumerate(LONGEST_FIRST)}
    order = sorted(items, key=lambda it: (it[1] in REFERENCES, rank.get(it[1], len(rank))))
    args = [(cfg, ds, data, name, str(run_path(cfg, data, name)) if (data, name) in trained else None)
            for data, name in order]
    workers = max(1, min(jobs or cores(), len(args)))
    if workers == 1:
        with one_thread_each():
            rows = [_build_and_score(a) for a in args]
    else:
        with spawn_pool(workers) as pool:
            rows = list(pool.map(_build_and_score, args))
    by_item = dict(zip(order, rows))
    df = pd.DataFrame([by_item[it] for it in items])
    write_csv_atomic(df, ground_truth_dir(cfg) / GROUND_TRUTH_CSV)
    return df


def _build_and_score(arg: tuple[Config, Design, str, str, str | None]) -> dict[str, object]:
    """One task of `ground_truth` (module level, so that a worker process can run it)."""
    cfg, ds, data, name, out = arg
    torch.set_num_threads(1)
    stores = write_stores(cfg, ds, data)
    folder = None
    if out is not None:
        folder = Path(_train_one((cfg, name, str(stores["train"].path), out)))
    return score_one(cfg, ds, stores, data, name, folder)


# --------------------------------------------------------------------------- what the notebook shows


def design_table(ds: Design) -> pd.DataFrame:
    """What is planted, one row per component: how many, how it is written into x, how often it is active."""
    lo, hi = ds.magnitudes
    rates = np.geomspace(*ds.global_rates, ds.n_global)
    T = ds.seq_len - 1
    return pd.DataFrame([
        {"component": "global features", "count": ds.n_global,
         "in x": f"unit directions, magnitude uniform in [{lo}, {hi}]",
         "active": f"{rates[0]:.0%} to {rates[-1]:.0%} of tokens (log-spaced), whatever the position",
         "per token": float(rates.sum())},
        {"component": "position-dependent features", "count": ds.n_position,
         "in x": f"unit directions, magnitude uniform in [{lo}, {hi}]",
         "active": f"{ds.position_rate:.0%} of the tokens of its own bucket ({ds.per_bucket} per bucket), none "
                   f"elsewhere; control: {ds.position_rate / ds.buckets:.1%} everywhere",
         "per token": ds.per_bucket * ds.position_rate},
        {"component": "position code", "count": ds.n_code,
         "in x": f"{ds.code_amplitude}·√2·cos(πjs) on direction j, s = (t − ½)/(L − 1)",
         "active": "every token; control: none", "per token": float(ds.n_code)},
        {"component": "noise", "count": ds.d_model, "in x": f"isotropic Gaussian, std {ds.noise_std} per dimension",
         "active": "every token", "per token": float("nan")},
        {"component": "tokens", "count": (ds.train_sequences + ds.val_sequences) * T,
         "in x": f"positions 1..{T} (L = {ds.seq_len}, BOS excluded), {ds.buckets} buckets",
         "active": f"train {ds.train_sequences} × {T}, validation {ds.val_sequences} × {T} sequences",
         "per token": float("nan")},
    ]).set_index("component")


def null_bound(buckets: int, test_tokens: int) -> float:
    """How far D_x may sit from D_x(null) by noise alone: three standard deviations.

    Where the features carry nothing about position, each of the four accuracies in
    D_x − D_x(null) = (acc_P_x − acc_G_x − acc_P_null + acc_G_null) / (1 − c) is a proportion of n
    held-out tokens around chance c, with variance c(1 − c)/n; independent, their difference has
    standard deviation 2·√(c(1 − c)/n)/(1 − c). (The control's tokens are independent, so no
    clustering by sequence enters.)
    """
    c = 1.0 / buckets
    return 3 * 2 * math.sqrt(c * (1 - c) / test_tokens) / (1 - c)


def controls(df: pd.DataFrame) -> pd.DataFrame:
    """Each required outcome of the ground truth, its value and whether it holds."""
    def row(data: str, sae: str) -> pd.Series:
        return df[(df["data"] == data) & (df["variant"] == sae)].iloc[0]

    checks = []

    def check(what: str, value: float, required: str, holds: bool) -> None:
        checks.append({"check": what, "value": round(float(value), 3), "required": required, "holds": bool(holds)})

    planted_raw, control_raw = row("planted", "echo")["acc_raw"], row("control", "echo")["acc_raw"]
    chance = float(df["chance"].iloc[0])
    acc_noise = 3 * math.sqrt(chance * (1 - chance) / int(df["test_tokens"].iloc[0]))
    check("raw-x probe, planted data", planted_raw, "≥ 0.95", planted_raw >= 0.95)
    check("raw-x probe, control data", control_raw, f"chance {chance:.3f} ± {acc_noise:.3f}",
          abs(control_raw - chance) <= acc_noise)
    echo, oracle = row("planted", "echo"), row("planted", "oracle")
    check("echo: old U (position input kept)", echo["U"], "≥ 0.5", echo["U"] >= 0.5)
    check("echo: new U_x (position input shuffled)", echo["U_x"], "≤ 0.05", echo["U_x"] <= 0.05)
    check("oracle: acc_position", oracle["acc_position"], "≥ 0.95", oracle["acc_position"] >= 0.95)
    check("oracle: old U", oracle["U"], "≥ 0.9", oracle["U"] >= 0.9)
    check("oracle: new U_x", oracle["U_x"], "≥ 0.9", oracle["U_x"] >= 0.9)
    ctrl = df[df["data"] == "control"]
    bound = null_bound(int(1 / chance + 0.5), int(ctrl["test_tokens"].iloc[0]))
    gap = (ctrl["D_x"] - ctrl["D_x_null"]).abs()
    worst = ctrl.loc[gap.idxmax(), "variant"]
    check(f"control: largest |D_x − D_x(null)| over every SAE ({worst})", gap.max(), f"≤ {bound:.3f}",
          gap.max() <= bound)
    return pd.DataFrame(checks).set_index("check")


SUMMARY = ["recovery_global", "recovery_position", "recovery_code", "explained_variance", "l0",
           "U", "U_x", "D_x", "D_x_null"]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per SAE (references first), per data set its recovery, EV, L0 and scores."""
    order = [*REFERENCES, *sorted(set(df["variant"]) - set(REFERENCES))]
    wide = df.pivot(index="variant", columns="data", values=SUMMARY).swaplevel(axis=1)
    return wide.reindex(index=order, columns=pd.MultiIndex.from_product([DATASETS, SUMMARY])).round(3)
