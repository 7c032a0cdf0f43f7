"""Feature inspection (notebook 07): what one feature of a trained SAE responds to, read off the validation store.

A run is addressed by its identity, ``open_run(cfg, "contrastive", layer=8, seed=0)``, or by its folder
(`open_folder`). Opening checks it as the evaluation does (`checkpoint.check_run`, the validation store's
settings and normalisation: `metrics.check_normalisation`). The first question asked of a run makes one pass
of its SAE over the whole validation store (`RunStats`, kept on the run): per position and feature the
activation sum and the firing count, per feature the sum of squares, the `TOP_KEPT` largest activations with
their store rows, and a histogram on fixed log-spaced bins (`HIST_EDGES`). Everything below is read from it:

    per feature   `top_contexts` (the top tokens with a window of their sequence around each, and
                  `contexts_html` to show them), `histogram`, `position_profile` (mean and firing rate per
                  position, and the gate or mask the variant puts on the feature, where it has one)
    per run       `feature_table`: firing rate, mean and largest activation, the share of the activation
                  variance explained by position (`posae.eval.metrics.position_variance_share`, the number
                  feature_stats.csv holds, here on every validation token), the correlation with position,
                  the peak position, and how many distinct positions and tokens its top tokens span;
                  `position_heatmap` (mean by position of the most positional features),
                  `position_correlated` (global features ranked by |correlation with position|),
                  `gallery` (per group: the most positional, the most frequent, and random live features)
    any text      `features_of`: the SAE's features of a text, through capture's own forward
                  (`layer_outputs`, `run_to`), the store's normalisation and the SAE's encoder

Groups are the variant's own (`SAE.groups`); an undivided dictionary is one group, "all" (not the arbitrary
halves the probes split it into: a gallery of half a dictionary would show nothing about groups).

A "position feature" that is a position detector ignoring the token shows as top tokens at one or a few
positions (`top_positions` small) with many different tokens (`top_tokens` large), a position share near 1,
and, in `features_of`, activity at its positions in any text. The numbers are the reader's to check: nothing
here decides it.
"""

from __future__ import annotations

import dataclasses
import functools
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

from posae import checkpoint
from posae.config import Config
from posae.data import models
from posae.data.capture import layer_outputs, run_to
from posae.data.store import ActivationStore, open_layer_stores
from posae.eval.metrics import Sums, check_normalisation, position_variance_share
from posae.paths import lock_path, locked, run_dir, sae_dir, write_csv_atomic
from posae.saes import SAE, as_variant_list

TOP_KEPT = 16  # largest activations kept per feature by the pass over the store (`top_contexts` asks for more anew)
LOG_LOW, LOG_HIGH, BINS_PER_DECADE = -3, 3, 10
# Bins of the nonzero activations: 10 a decade over [1e-3, 1e3); values outside go into the end bins.
HIST_EDGES = np.logspace(LOG_LOW, LOG_HIGH, (LOG_HIGH - LOG_LOW) * BINS_PER_DECADE + 1)
GALLERY_SIZE = 8
INSPECT_CSV = "inspect_gallery.csv"
RUN_KEYS = ["variant", "layer", "seed"]


class InspectError(ValueError):
    """A feature, group or text an inspection cannot take; the message names it and the fix."""


# --------------------------------------------------------------------------- runs


@dataclass
class RunStats:
    """One pass of a run's SAE over its validation store (`run_stats`); float64 sums."""

    n: int  # tokens
    count_T: np.ndarray  # tokens at each position
    sum_TK: np.ndarray  # Σf per position and feature
    fired_TK: np.ndarray  # tokens with f > 0, per position and feature
    sq_K: np.ndarray  # Σf² per feature
    top_val_RK: np.ndarray  # the R largest activations of each feature, descending (float32)
    top_row_RK: np.ndarray  # their store rows
    hist_KB: np.ndarray  # nonzero activations per `HIST_EDGES` bin


class Run:
    """One trained run opened for inspection: its SAE (eval mode, CPU), its layer's validation store and config.

    `stats` is the pass over the store, made on first use and kept.
    """

    def __init__(self, cfg: Config, folder: Path, info: dict[str, Any], sae: SAE, store: ActivationStore):
        self.cfg, self.folder, self.info, self.sae, self.store = cfg, folder, info, sae, store
        self._stats: RunStats | None = None
        self._table: pd.DataFrame | None = None

    variant = property(lambda self: self.info["variant"])
    layer = property(lambda self: int(self.info["layer"]))
    seed = property(lambda self: int(self.info["seed"]))

    @property
    def label(self) -> str:
        return f"{self.variant} · layer {self.layer} · seed {self.seed}"

    @property
    def groups(self) -> dict[str, range]:
        """The variant's groups, or the whole dictionary as one group "all" when it has none."""
        return self.sae.groups if self.sae.groups is not None else {"all": range(self.sae.k)}

    @property
    def stats(self) -> RunStats:
        if self._stats is None:
            self._stats = run_stats(self.sae, self.store)
        return self._stats

    def __repr__(self) -> str:
        return f"Run({self.label}, k={self.sae.k}, {len(self.store):,} validation tokens)"


def open_folder(cfg: Config, folder: Path | str) -> Run:
    """The run in `folder` (runs/<config>/saes/<variant>/layer_<L>/seed_<s>), checked against `cfg`'s
    validation store of its layer."""
    folder = Path(folder)
    info = checkpoint.check_run(folder)
    if info is None:
        raise FileNotFoundError(f"{folder}: no trained run here ({checkpoint.INFO} missing). Fix: train it "
                                "(notebooks/03_train.ipynb -p variant <name>), or name a run that exists")
    if not info.get("done"):
        raise InspectError(f"{folder}: the run is not finished (step {info.get('step')}). Fix: let its training "
                           "stage finish (notebooks/03_train.ipynb resumes it)")
    layer = int(info["layer"])
    if layer not in cfg.capture.layers:
        raise InspectError(f"{folder}: a run of layer {layer}, which {cfg.source} does not capture (capture.layers "
                           f"{list(cfg.capture.layers)}). Fix: open it with the config it was trained under")
    store = open_layer_stores(cfg, "val", [layer])[layer]
    check_normalisation(folder, store)
    return Run(cfg, folder, info, checkpoint.load_sae(folder, "cpu"), store)


def open_run(cfg: Config, variant: str, layer: int, seed: int = 0) -> Run:
    """The finished run of `variant` at `layer` and `seed` under `cfg` (`open_folder` of its folder)."""
    as_variant_list([variant])  # an unknown name fails here, listing the known ones
    return open_folder(cfg, sae_dir(cfg.name, variant, layer, seed))


def open_runs(cfg: Config, variants: str | Iterable[str], layer: int | None = None, seed: int = 0) -> list[Run]:
    """`open_run` for each of `variants` (a list or "a,b,c") at `layer` (None: `middle_layer`)."""
    layer = middle_layer(cfg) if layer is None else layer
    return [open_run(cfg, v, layer, seed) for v in as_variant_list(variants) or []]


def middle_layer(cfg: Config) -> int:
    """The middle one of the captured layers (the default config's 3, 8, 13: 8)."""
    layers = sorted(cfg.capture.layers)
    return layers[len(layers) // 2]


# --------------------------------------------------------------------------- the pass over the store


@torch.inference_mode()
def run_stats(sae: SAE, store: ActivationStore, top: int = TOP_KEPT, chunk: int = 8192) -> RunStats:
    """Encode every row of `store` (each with its own position), `chunk` rows at a time, into `RunStats`.

    Sums are float32 within a chunk and float64 across chunks (as `posae.eval.metrics.accumulate`'s). A store
    laid out as capture writes it (whole sequences, positions in order) is read in chunks of whole sequences
    and summed per position by a reshape; any other layout by an index_add (the same sums). Each
    chunk's top-`top` per feature is merged with those kept so far, the kept ones first, so an activation
    equal to a kept one does not displace it (within a chunk, equal values come in topk's order). A feature
    with fewer nonzero activations than `top` keeps zeros at the end of its list.
    """
    T, K, N = store.seq_len, sae.k, len(store)
    pos_all = np.asarray(store.pos_N)
    first = int(pos_all[0]) if N else 0
    period = T - first  # rows of one whole sequence in a store written by capture
    if N and N % period == 0 and (pos_all.reshape(-1, period) == np.arange(first, T)).all():
        chunk = max(1, chunk // period) * period  # whole sequences per chunk: per-position sums by a reshape
    else:
        period = 0
    B = len(HIST_EDGES) - 1
    count_T, sum_TK, fired_TK = np.zeros(T), np.zeros((T, K)), np.zeros((T, K))
    sq_K, hist = np.zeros(K), np.zeros(K * B)
    top_val, top_row = torch.zeros(0, K), torch.zeros(0, K, dtype=torch.int64)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        pos_B = torch.from_numpy(pos_all[s:e].astype(np.int64))
        f_BK = sae.encode(store.normalised(slice(s, e)), pos_B).float()
        fired_BK = f_BK > 0
        count_T += np.bincount(pos_B.numpy(), minlength=T)
        if period:  # rows are whole sequences, positions first..T-1 in order: sum over the sequences
            sum_TK[first:] += f_BK.view(-1, period, K).sum(0).numpy()
            fired_TK[first:] += fired_BK.view(-1, period, K).sum(0, dtype=torch.float32).numpy()
        else:
            sum_TK += torch.zeros(T, K).index_add_(0, pos_B, f_BK).numpy()
            fired_TK += torch.zeros(T, K).index_add_(0, pos_B, fired_BK.float()).numpy()
        sq_K += f_BK.square().sum(0).numpy()
        flat = fired_BK.view(-1).nonzero().squeeze(1)
        # The bin of each nonzero value by arithmetic on its log (the edges are evenly spaced in log10).
        bins = ((f_BK.view(-1)[flat].log10() - LOG_LOW) * BINS_PER_DECADE).floor_().clamp_(0, B - 1).long()
        hist += torch.bincount(flat % K * B + bins, minlength=K * B).numpy()
        val, idx = torch.topk(f_BK, min(top, e - s), dim=0)
        val, row = torch.cat([top_val, val]), torch.cat([top_row, idx + s])
        order = torch.sort(val, dim=0, descending=True, stable=True).indices[:top]
        top_val, top_row = val.gather(0, order), row.gather(0, order)
    return RunStats(N, count_T, sum_TK, fired_TK, sq_K, top_val.numpy(), top_row.numpy(), hist.reshape(K, B))


def groups_of(run: Run) -> np.ndarray:
    """The group of each feature [K]."""
    group_K = np.empty(run.sae.k, dtype=object)
    for name, r in run.groups.items():
        group_K[r.start:r.stop] = name
    return group_K


def _sums(run: Run) -> Sums:
    """The pass as `posae.eval.metrics.Sums`, so that the position share is that module's definition."""
    st = run.stats
    s = Sums(run.sae.d_model, run.sae.k, run.store.seq_len, run.groups, run.sae.groups is not None)
    s.n, s.count_T, s.act_sum_TK = st.n, st.count_T, st.sum_TK
    s.act_sum_K, s.act_sq_K, s.fired_K = st.sum_TK.sum(0), st.sq_K, st.fired_TK.sum(0)
    return s


# --------------------------------------------------------------------------- per run


def feature_table(run: Run) -> pd.DataFrame:
    """One row per feature: group, firing rate, mean and largest activation, position share (between-position
    variance over total, NaN when dead), correlation with position, peak position (of the mean), and the
    number of distinct positions and tokens among its top `TOP_KEPT` tokens (live ones only)."""
    if run._table is not None:
        return run._table
    st, K = run.stats, run.sae.k
    fired_K, sum_K = st.fired_TK.sum(0), st.sum_TK.sum(0)
    t_T = np.arange(len(st.count_T), dtype=np.float64)
    mean_t = float(t_T @ st.count_T) / st.n
    var_t = float(t_T ** 2 @ st.count_T) / st.n - mean_t ** 2
    mean_f = sum_K / st.n
    var_f = st.sq_K / st.n - mean_f ** 2
    cov = (t_T @ st.sum_TK) / st.n - mean_f * mean_t
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where((var_f > 1e-12 * np.maximum(st.sq_K / st.n, 1e-30)) & (var_t > 0),
                        cov / np.sqrt(np.abs(var_f) * var_t), np.nan)
        mean_TK = st.sum_TK / st.count_T[:, None]
    mean_TK[st.count_T == 0] = -np.inf  # positions absent from the store (BOS) are never the peak
    live_RK = st.top_val_RK > 0
    pos_RK, tok_RK = (np.asarray(a)[st.top_row_RK] for a in (run.store.pos_N, run.store.tokens_N))
    run._table = pd.DataFrame({
        "feature": np.arange(K), "group": groups_of(run), "firing_rate": fired_K / st.n, "mean_activation": mean_f,
        "max_activation": st.top_val_RK[0] if len(st.top_val_RK) else np.zeros(K),
        "position_share": position_variance_share(_sums(run)), "position_corr": np.clip(corr, -1.0, 1.0),
        "peak_position": np.where(fired_K > 0, mean_TK.argmax(0), -1),
        "top_positions": [len(np.unique(pos_RK[live_RK[:, k], k])) for k in range(K)],
        "top_tokens": [len(np.unique(tok_RK[live_RK[:, k], k])) for k in range(K)],
    })
    return run._table


def most_positional(run: Run, n: int, group: str | None = None) -> list[int]:
    """The `n` live features (of `group`, or of any) with the largest position share, largest first."""
    table = feature_table(run).dropna(subset=["position_share"])
    if group is not None:
        if group not in run.groups:
            raise InspectError(f"group {group!r}: the {run.label} SAE has groups {', '.join(run.groups)}. "
                               "Fix: name one of them, or None for any")
        table = table[table["group"] == group]
    return table.sort_values(["position_share", "feature"], ascending=[False, True]).head(n)["feature"].tolist()


def position_heatmap(run: Run, n: int = 32) -> pd.DataFrame:
    """Mean activation by position of the `n` most positional features (`most_positional`), each row divided
    by its largest mean (1 at its peak); rows in decreasing share, columns the positions in the store."""
    picked = np.asarray(most_positional(run, n), dtype=np.int64)
    st = run.stats
    seen = np.flatnonzero(st.count_T)
    mean_FT = (st.sum_TK[seen][:, picked] / st.count_T[seen, None]).T
    mean_FT = mean_FT / np.maximum(mean_FT.max(1, keepdims=True), 1e-12)
    return pd.DataFrame(mean_FT, index=pd.Index(picked, name="feature"), columns=pd.Index(seen, name="position"))


def summary(runs: list[Run], threshold: float = 0.5) -> pd.DataFrame:
    """Per run and group: features, live ones (firing on some validation token), how many have a position share
    above `threshold`, the median share of the live ones, and the largest |correlation with position|."""
    rows = []
    for run in runs:
        table = feature_table(run)
        for group, t in table.groupby("group", sort=False):
            live = t[t["firing_rate"] > 0]
            rows.append({"run": run.label, "group": group, "features": len(t), "live": len(live),
                         f"share > {threshold}": int((live["position_share"] > threshold).sum()),
                         "median share": float(live["position_share"].median()),
                         "max |corr|": float(live["position_corr"].abs().max())})
    return pd.DataFrame(rows).set_index(["run", "group"])


def position_correlated(run: Run, n: int = 10) -> pd.DataFrame:
    """The `n` live global features (the whole dictionary where there are no groups) most correlated with
    position, by |Pearson correlation| of activation and position over the validation tokens."""
    table = feature_table(run)
    group = "global" if "global" in run.groups else "all"
    rows = table[(table["group"] == group) & table["position_corr"].notna()]
    order = rows["position_corr"].abs().sort_values(ascending=False, kind="stable").index[:n]
    return rows.loc[order, ["feature", "group", "position_corr", "position_share", "peak_position", "firing_rate",
                            "top_positions", "top_tokens"]].reset_index(drop=True)


def gallery(run: Run, size: int = GALLERY_SIZE, seed: int = 0) -> pd.DataFrame:
    """Per group, `size` live features of each pick: the most positional (largest position share), the most
    frequent (largest firing rate) and random ones (drawn with `seed`, in feature order). Deterministic: the
    same run, size and seed give the same picks. A feature may appear under several picks."""
    table = feature_table(run)
    rng = np.random.default_rng(seed)
    parts = []
    for group in run.groups:  # the groups' fixed order, so each group's draw is reproducible
        live = table[(table["group"] == group) & (table["firing_rate"] > 0)]
        picks = {
            "positional": live.dropna(subset=["position_share"]).sort_values(
                ["position_share", "feature"], ascending=[False, True]).head(size),
            "frequent": live.sort_values(["firing_rate", "feature"], ascending=[False, True]).head(size),
            "random": live.loc[np.sort(rng.choice(live.index.to_numpy(), min(size, len(live)), replace=False))],
        }
        for pick, rows in picks.items():
            parts.append(rows.assign(pick=pick, rank=np.arange(1, len(rows) + 1)))
    columns = ["group", "pick", "rank", *(c for c in table.columns if c != "group")]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def write_galleries(cfg: Config, runs: list[Run], size: int = GALLERY_SIZE, seed: int = 0) -> pd.DataFrame:
    """The galleries of `runs`, tagged with their identity, into runs/<config>/inspect_gallery.csv (atomically;
    rows of other runs already in the file are kept). Returns the rows of `runs`."""
    df = pd.concat([gallery(r, size, seed).assign(variant=r.variant, layer=r.layer, seed=r.seed) for r in runs],
                   ignore_index=True)
    df = df[RUN_KEYS + [c for c in df.columns if c not in RUN_KEYS]]
    path = run_dir(cfg.name) / INSPECT_CSV
    with locked(lock_path(path, "merge"), f"updating {INSPECT_CSV}"):
        merged = df
        if path.exists():
            old = pd.read_csv(path)
            ours = set(map(tuple, df[RUN_KEYS].drop_duplicates().to_numpy().tolist()))
            keep = old[[tuple(k) not in ours for k in old[RUN_KEYS].to_numpy().tolist()]]
            if len(keep):  # an empty frame in a concat can change the columns' dtypes, and so the file's bytes
                merged = pd.concat([keep, df], ignore_index=True)
        write_csv_atomic(merged.sort_values(RUN_KEYS + ["group", "pick", "rank"], kind="stable"), path)
    return df


# --------------------------------------------------------------------------- per feature


def _check_feature(run: Run, feature: int) -> int:
    if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or not 0 <= feature < run.sae.k:
        raise InspectError(f"feature {feature!r}: not a feature of the {run.label} SAE. Fix: give an integer in "
                           f"0..{run.sae.k - 1}")
    return int(feature)


def _encode_rows(run: Run, rows_N: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        pos_N = torch.from_numpy(np.asarray(run.store.pos_N)[rows_N].astype(np.int64))
        return run.sae.encode(run.store.normalised(rows_N), pos_N).float().numpy()


CONTEXT_COLUMNS = ["rank", "row", "seq", "position", "offset", "token_id", "token", "activation", "is_max"]


def top_contexts(run: Run, feature: int, k: int = 10, window: int = 8) -> pd.DataFrame:
    """The `k` validation tokens on which `feature` is largest, each with up to `window` tokens of its sequence
    on either side: one row per token shown.

    Columns: rank (1 = largest), row (in the store), seq, position, offset (from the maximum), token_id,
    token (the tokenizer's text of that one id), activation (of `feature` there), is_max. Tokens on which the
    feature is 0 are not maxima: a feature that fires on fewer than `k` tokens gets fewer contexts.
    """
    return contexts_of(run, [feature], k, window).drop(columns="feature")


def contexts_of(run: Run, features: Iterable[int], k: int = 10, window: int = 8) -> pd.DataFrame:
    """`top_contexts` of several features in one frame (a `feature` column first), their rows encoded at once."""
    features = [_check_feature(run, f) for f in features]
    if k < 1 or window < 0:
        raise InspectError(f"top_contexts: k = {k}, window = {window}. Fix: k >= 1 and window >= 0")
    st = run.stats if k <= TOP_KEPT else run_stats(run.sae, run.store, top=k)
    seq_N, pos_N, tok_N = (np.asarray(a) for a in (run.store.seq_N, run.store.pos_N, run.store.tokens_N))
    shown = []
    for feature in features:
        vals, rows = st.top_val_RK[:k, feature], st.top_row_RK[:k, feature]
        for rank, r in enumerate(rows[vals > 0], 1):
            around = np.arange(max(0, r - window), min(len(seq_N), r + window + 1))
            around = around[seq_N[around] == seq_N[r]]  # the store holds each sequence's rows together, in order
            shown.append(pd.DataFrame({"feature": feature, "rank": rank, "row": around, "offset": around - r}))
    if not shown:
        return pd.DataFrame(columns=["feature", *CONTEXT_COLUMNS])
    df = pd.concat(shown, ignore_index=True)
    rows_N = df["row"].to_numpy()
    unique, back = np.unique(rows_N, return_inverse=True)
    df["activation"] = _encode_rows(run, unique)[back, df["feature"].to_numpy()]
    df["seq"], df["position"], df["token_id"] = seq_N[rows_N], pos_N[rows_N], tok_N[rows_N]
    df["token"] = token_strings(run, df["token_id"].to_numpy())
    df["is_max"] = df["offset"] == 0
    return df[["feature", *CONTEXT_COLUMNS]]


def token_strings(run: Run, ids: np.ndarray) -> list[str]:
    """The text of each token id alone, as the run's tokenizer decodes it."""
    tokenizer = tokenizer_of(run.cfg.model)
    text = {int(i): tokenizer.decode([int(i)]) for i in np.unique(ids)}
    return [text[int(i)] for i in ids]


def histogram(run: Run, feature: int) -> pd.DataFrame:
    """How often `feature` takes each value on the validation tokens: one row for exact zeros (low = high = 0),
    then one per `HIST_EDGES` bin [low, high) of nonzero activations (the end bins also take what lies beyond)."""
    feature = _check_feature(run, feature)
    st = run.stats
    zeros = st.n - int(st.fired_TK[:, feature].sum())
    return pd.DataFrame({"low": np.r_[0.0, HIST_EDGES[:-1]], "high": np.r_[0.0, HIST_EDGES[1:]],
                         "tokens": np.r_[zeros, st.hist_KB[feature]].astype(np.int64)})


def gate_profile(run: Run, feature: int) -> np.ndarray | None:
    """The multiplier the variant puts on `feature` at each position 0..T-1 (its gate or mask, `SAE.gates`);
    None where there is none: an ungated variant, or a feature outside the position group."""
    feature = _check_feature(run, feature)
    position = run.sae.groups.get("position") if run.sae.groups is not None else None
    if position is None or feature not in position:
        return None
    with torch.inference_mode():
        gates_TP = run.sae.gates(torch.arange(run.sae.seq_len))
    return None if gates_TP is None else gates_TP[:, feature - position.start].float().numpy()


def position_profile(run: Run, feature: int) -> pd.DataFrame:
    """Per position in the store: tokens, mean activation of `feature`, its firing rate, and its gate (NaN
    where the variant has none for it)."""
    feature = _check_feature(run, feature)
    st = run.stats
    seen = np.flatnonzero(st.count_T)
    gate_T = gate_profile(run, feature)
    return pd.DataFrame({"position": seen, "tokens": st.count_T[seen].astype(np.int64),
                         "mean": st.sum_TK[seen, feature] / st.count_T[seen],
                         "firing_rate": st.fired_TK[seen, feature] / st.count_T[seen],
                         "gate": gate_T[seen] if gate_T is not None else np.nan})


# --------------------------------------------------------------------------- any text


@functools.lru_cache(maxsize=2)
def tokenizer_of(model_cfg: Any) -> Any:
    """The model's tokenizer, loaded once per process."""
    return models.load_tokenizer(model_cfg)


@functools.lru_cache(maxsize=1)
def _model(model_cfg: Any, tokenizer_cfg: Any) -> models.Loaded:
    return models.load_model(model_cfg, tokenizer=tokenizer_of(tokenizer_cfg))


def model_of(run: Run) -> models.Loaded:
    """The language model in the dtype the run's store was captured in (as the fidelity loads it), loaded once
    per process: runs of one config share it."""
    return _model(dataclasses.replace(run.cfg.model, dtype=run.store.meta["forward_dtype"]), run.cfg.model)


def features_of(text: str, run: Run, active_only: bool = True) -> pd.DataFrame:
    """The run's features of `text`, as capture and training saw tokens: BOS then the text's tokens (no other
    special tokens), the model's forward stopped at the run's layer (`layer_outputs`, `run_to`), the store's
    normalisation, and the SAE fed each token's position. Positions start where the store's do (1 when BOS
    is excluded from it).

    Tidy: one row per (token, feature), columns token, token_id, position, feature, group, activation; with
    `active_only` the rows whose activation is 0 are left out. Sorted by position, then activation descending.
    """
    if not isinstance(text, str) or not text.strip():
        raise InspectError(f"features_of: text {text!r} holds no tokens. Fix: pass a non-empty string")
    tokenizer = tokenizer_of(run.cfg.model)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    L, first = len(ids) + 1, 1 if run.store.meta.get("exclude_bos", True) else 0
    if L > run.store.seq_len:
        raise InspectError(f"features_of: the text is {len(ids)} tokens, but the {run.label} SAE knows positions "
                           f"up to {run.store.seq_len - 1} (corpus.seq_len {run.store.seq_len}, BOS included). "
                           f"Fix: shorten it to at most {run.store.seq_len - 1} tokens")
    loaded = model_of(run)
    ids_1L = torch.tensor([[tokenizer.bos_token_id, *ids]], device=loaded.device)
    with torch.inference_mode(), layer_outputs(loaded.model, [run.layer]) as acts:
        run_to(loaded.model, ids_1L)
        x_LD = acts[run.layer][0].float().cpu()
        pos_L = torch.arange(first, L)
        f_LK = run.sae.encode(run.store.normalise(x_LD[first:]), pos_L).float().numpy()
    token_L = ids_1L[0, first:].cpu().numpy()
    group_K = groups_of(run)
    P, K = f_LK.shape
    df = pd.DataFrame({"token": np.repeat(token_strings(run, token_L), K), "token_id": np.repeat(token_L, K),
                       "position": np.repeat(pos_L.numpy(), K), "feature": np.tile(np.arange(K), P),
                       "group": np.tile(group_K, P), "activation": f_LK.reshape(-1)})
    if active_only:
        df = df[df["activation"] > 0]
    return df.sort_values(["position", "activation"], ascending=[True, False], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- HTML


def _background(activation: float, top: float) -> str:
    alpha = 0.0 if top <= 0 else min(max(activation / top, 0.0), 1.0)
    return f"rgba(230, 90, 20, {alpha:.2f})"


def _visible(token: str) -> str:
    """Token text escaped for HTML, with line breaks and tabs shown as marks (they would break the line)."""
    return html.escape(token.replace("\n", "↵").replace("\r", "").replace("\t", "→"), quote=True)


def contexts_html(contexts: pd.DataFrame) -> str:
    """`top_contexts`'s frame as HTML, one line per context: each token's background as dark as its activation
    (relative to the largest in the frame), the maximum outlined and bold, the value in each token's tooltip.
    Token text is escaped, so a token such as ``<script>`` shows as text. For ``IPython.display.HTML``."""
    if contexts.empty:
        return "<p><i>no token on which this feature is above 0</i></p>"
    top = float(contexts["activation"].max())
    lines = []
    for rank, ctx in contexts.groupby("rank", sort=True):
        peak = ctx[ctx["is_max"]].iloc[0]
        spans = []
        for t in ctx.itertuples():
            style = f"background:{_background(t.activation, top)}"
            if t.is_max:
                style += ";outline:1.5px solid #000;font-weight:bold"
            spans.append(f'<span style="{style}" title="position {t.position}: {t.activation:.3g}">'
                         f"{_visible(t.token)}</span>")
        lines.append(f'<div style="font-family:monospace;white-space:pre;line-height:1.7">'
                     f'<span style="color:#777">#{rank} pos {peak.position:>3} {peak.activation:7.3f} │ </span>'
                     f'{"".join(spans)}</div>')
    return "\n".join(lines)


def gallery_html(run: Run, picks: pd.DataFrame | None = None, contexts: int = 3, window: int = 6) -> str:
    """`gallery`'s picks (computed with its defaults when None) as HTML: per group and pick, each feature's
    numbers and its `contexts` top contexts (`contexts_html`)."""
    picks = gallery(run) if picks is None else picks
    shown = contexts_of(run, picks["feature"].unique(), contexts, window)
    by_feature = {f: ctx.drop(columns="feature") for f, ctx in shown.groupby("feature")}
    out = [f"<h3>{html.escape(run.label)}</h3>"]
    for (group, pick), rows in picks.groupby(["group", "pick"], sort=False):
        out.append(f"<details open><summary><b>{html.escape(str(group))}</b> group, {html.escape(str(pick))} "
                   f"({len(rows)})</summary>")
        for r in rows.itertuples():
            out.append(f'<div style="margin:6px 0 2px 0"><b>feature {r.feature}</b> <span style="color:#555">'
                       f"position share {r.position_share:.2f} · corr. with position {r.position_corr:+.2f} · "
                       f"fires on {r.firing_rate:.1%} · peak at position {r.peak_position} · top {TOP_KEPT}: "
                       f"{r.top_positions} positions, {r.top_tokens} tokens</span></div>")
            out.append(contexts_html(by_feature.get(r.feature, shown.iloc[:0])))
        out.append("</details>")
    return "\n".join(out)


# --------------------------------------------------------------------------- plots


def plot_heatmaps(runs: list[Run], n: int = 32):
    """`position_heatmap` of each run side by side (rows: features by decreasing position share)."""
    import matplotlib.pyplot as plt

    from posae.report.plots import PAGE_WIDTH_IN

    fig, axes = plt.subplots(1, len(runs), figsize=(PAGE_WIDTH_IN * max(1, len(runs)) / 2, 3.4), squeeze=False,
                             layout="constrained")
    for ax, run in zip(axes[0], runs):
        hm = position_heatmap(run, n)
        im = ax.imshow(hm.to_numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest",
                       extent=(hm.columns[0] - 0.5, hm.columns[-1] + 0.5, len(hm) - 0.5, -0.5))
        ax.set_yticks(range(len(hm)), [str(f) for f in hm.index], fontsize=5)
        ax.set(xlabel="position", title=run.label)
        ax.grid(False)
    axes[0][0].set_ylabel("feature (largest position share first)")
    fig.colorbar(im, ax=axes[0].tolist(), label="mean activation / its peak")
    return fig


def plot_profiles(run: Run, features: Iterable[int]):
    """Mean activation, firing rate and (where the variant has one) the gate of each of `features`, by position."""
    import matplotlib.pyplot as plt

    from posae.report.plots import PAGE_WIDTH_IN

    features = list(features)
    profiles = {f: position_profile(run, f) for f in features}
    gated = any(p["gate"].notna().any() for p in profiles.values())
    panels = ["mean", "firing_rate"] + (["gate"] if gated else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH_IN, 2.6), squeeze=False)
    for ax, column in zip(axes[0], panels):
        for f, p in profiles.items():
            ax.plot(p["position"], p[column], label=f"feature {f}", lw=1)
        ax.set(xlabel="position", title=column.replace("_", " "))
    axes[0][0].legend(fontsize=6)
    fig.suptitle(run.label)
    fig.tight_layout()
    return fig


def plot_histograms(run: Run, features: Iterable[int]):
    """Each feature's nonzero activations on the validation tokens (log-spaced bins); the title gives the zeros."""
    import matplotlib.pyplot as plt

    from posae.report.plots import PAGE_WIDTH_IN

    features = list(features)
    fig, axes = plt.subplots(1, len(features), figsize=(PAGE_WIDTH_IN, 2.2), squeeze=False)
    for ax, f in zip(axes[0], features):
        h = histogram(run, f)
        zero, rest = h.iloc[0], h.iloc[1:]
        ax.stairs(rest["tokens"], np.r_[rest["low"].to_numpy(), rest["high"].iloc[-1]], fill=True)
        ax.set(xscale="log", xlabel="activation", title=f"feature {f}: {zero.tokens / h['tokens'].sum():.0%} zero")
    axes[0][0].set_ylabel("tokens")
    fig.suptitle(run.label)
    fig.tight_layout()
    return fig
