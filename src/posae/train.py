"""Training SAE variants on stored activations (notebook 03_train).

`train_variant` trains one variant on every configured layer and seed; each (layer, seed) is one
run, read as a story in `train_run`: resume or start, then `train_step`, `maybe_resample`,
`maybe_log` and `maybe_checkpoint` until the last step, then `record_budget` and a final checkpoint.

The objective is eq. 7 as written (docs/decisions.md §9): the mean over tokens of w_t · ‖x_t − x̂_t‖₂ (the
unsquared norm; ``train.recon_loss: squared`` squares it), w_t = 1 + t/L normalised to mean 1 in
each batch for the variants that use it (so λ1 means the same everywhere), plus λ1 · l1_scale ·
‖f‖₁ per token and the variant's own terms. The paper's Σ_t is a mean here: the scale belongs to
the learning rate.

Speed (the whole default reproduction within 10 minutes on two cores): bf16 autocast where the
CPU has native bf16, with fp32 master weights and AdamW state; the encoder written so autograd
runs 5 matmuls per step, not 6 (`SAE.pre_acts`); batches gathered straight from the memory-mapped
store; freed memory kept for reuse (`posae.memory`). Determinism: the data order is a pure
function of (seed, step) (`batch_indices`), and so is every resampling draw, so a resumed run
repeats the uninterrupted one bit for bit; the checkpoint carries the rest (weights, AdamW
moments, dead-feature counters).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

import posae
from posae import checkpoint, provenance
from posae.checks import load_config
from posae.config import Config, ConfigError, TrainConfig, check_parameter, to_dict
from posae.data import models
from posae.data.store import ActivationStore, open_layer_stores, reason
from posae.memory import keep_freed_memory
from posae.optim import AdamW
from posae.paths import clean_stale_temps, lock_path, locked, sae_dir
from posae.saes import SAE, ForwardOutput, build, variant_config

# --------------------------------------------------------------------------- public entry point


def train_variant(cfg: Config | str, variant: str, layers: list[int] | None = None, seeds: list[int] | None = None,
                  progress: bool = True) -> list[Path]:
    """Train `variant` on each layer and seed (default: the config's), skipping finished runs.

    Returns the run folders, in (layer, seed) order. Everything is validated and every store
    opened before the first step, so a wrong name fails at once.
    """
    cfg = load_config(cfg, check_model=False) if isinstance(cfg, (str, Path)) else cfg
    variant = check_parameter("variant", variant, str, "give a variant name, e.g. papermill -p variant contrastive")
    layers = check_parameter("layers", layers, tuple[int, ...] | None, 'give a list, e.g. papermill -y "layers: [8]"')
    seeds = check_parameter("seeds", seeds, tuple[int, ...] | None, 'give a list, e.g. papermill -y "seeds: [0]"')
    vcfg = variant_config(cfg, variant)  # an unknown variant fails here, listing the known ones
    device = models.resolve_device(cfg.model.device)  # a device that is not there fails before any store is read
    layers = list(cfg.capture.layers if layers is None else layers)
    seeds = list(vcfg.train.seeds if seeds is None else seeds)
    bad = [l for l in layers if l not in cfg.capture.layers]
    if bad:
        raise ConfigError(f"{cfg.source}: layer {bad[0]} is not captured. Fix: use one of {list(cfg.capture.layers)}")
    stores = open_layer_stores(cfg, "train", layers)  # missing, corrupt or stale stores fail here
    return [train_run(vcfg, variant, layer, seed, stores[layer], progress=progress, device=device)
            for layer in layers for seed in seeds]


# --------------------------------------------------------------------------- one run


@dataclass
class TrainState:
    """Everything that changes during a run; a checkpoint saves all of it."""

    sae: SAE
    opt: AdamW
    since_fired_K: Tensor  # optimizer steps since each feature last fired in a training batch
    resampled_K: Tensor  # features resampled at least once
    # The SAE as built, before any step: what resampling resets a revived feature's parameters to, and
    # what `record_budget` measures the tables' movement from. A function of the seed, so a resumed run
    # rebuilds it (`start`) and the checkpoint need not carry it.
    initial: SAE
    step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepStats:
    """What one optimizer step leaves for logging and resampling."""

    fired_K: Tensor
    x_BD: Tensor  # the last micro-batch, for resampling toward high-loss inputs
    x_hat_BD: Tensor  # its reconstruction
    err_sq_B: Tensor  # its squared reconstruction errors
    terms: dict[str, float] = field(default_factory=dict)  # loss terms, on logging steps
    metrics: dict[str, float] = field(default_factory=dict)
    finite: bool = True  # every micro-batch's loss was finite


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the run, the step and the checkpoint kept."""


def train_run(cfg: Config, variant: str, layer: int, seed: int, store: ActivationStore,
              progress: bool = True, out: Path | None = None, device: torch.device | str | None = None) -> Path:
    """Train one SAE (cfg already has the variant applied) into its run folder; resumes or skips.

    `device` defaults to the config's model.device (auto: CUDA when there is one); the store stays
    on the host and each micro-batch is copied to the device.
    """
    out = Path(out) if out is not None else sae_dir(cfg.name, variant, layer, seed)
    clean_stale_temps(out.parent, out.name)  # what a killed run left beside it, even if it finished
    ident = run_hash(cfg, variant, layer, seed, store)
    if is_finished(out, ident):
        return out
    # One trainer per run folder: a hand-run notebook 03 waits for the driver's kernel (or the other
    # way round) and then finds the run finished.
    with locked(lock_path(out, "train"), f"training {variant} layer {layer} seed {seed}"):
        if is_finished(out, ident, say=True):
            return out
        return _train_run(cfg, variant, layer, seed, store, progress, out, device, ident)


def _train_run(cfg: Config, variant: str, layer: int, seed: int, store: ActivationStore, progress: bool,
               out: Path, device: torch.device | str | None, ident: str) -> Path:
    """The run itself, under its lock: resume or start, step to the end, write the final checkpoint."""
    tcfg = cfg.train
    check_batch(cfg, store)
    device = models.resolve_device(cfg.model.device) if device is None else torch.device(device)
    state = resume(out, ident, cfg, variant, seed, store, device) or start(cfg, variant, seed, store, device)
    info = run_info(cfg, variant, layer, seed, store, ident, state, out)
    dtype = autocast_dtype(tcfg, device)
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum
    keep_freed_memory()
    clock = {"t": time.perf_counter(), "step": state.step, "start": time.perf_counter(), "start_step": state.step}
    with progress_bar(progress, f"{variant} layer {layer} seed {seed}", tcfg, tokens_per_step, state.step) as bar, \
            threads_for(state.sae, tcfg):
        while state.step < tcfg.steps:
            stats = train_step(state, store, cfg, seed, dtype, want_metrics=is_log_step(state.step + 1, tcfg))
            if not stats.finite:
                raise diverged(state.step, info, out)
            maybe_resample(state, stats, tcfg, seed)
            maybe_log(state, stats, tcfg, tokens_per_step, clock, bar)
            maybe_checkpoint(state, out, info, store, tcfg)
    record_budget(state, tcfg)
    elapsed = time.perf_counter() - clock["start"]
    info["train_seconds"] = info.get("train_seconds", 0.0) + elapsed
    info["tokens_per_s"] = (state.step - clock["start_step"]) * tokens_per_step / max(elapsed, 1e-9)
    save_checkpoint(state, out, info, store, done=True)
    return out


def start(cfg: Config, variant: str, seed: int, store: ActivationStore,
          device: torch.device | str = "cpu") -> TrainState:
    # Built (and seeded) on the CPU, then moved: the same initial weights on every device.
    sae = build(variant, store.d_model, cfg.sae, store.seq_len, seed=seed).to(device)
    sae.train()
    return TrainState(sae=sae, opt=make_optimizer(sae, cfg.train),
                      since_fired_K=torch.zeros(sae.k, dtype=torch.long, device=device),
                      resampled_K=torch.zeros(sae.k, dtype=torch.bool, device=device),
                      initial=copy.deepcopy(sae).requires_grad_(False))


def make_optimizer(sae: SAE, tcfg: TrainConfig) -> AdamW:
    # torch's fused AdamW kernel (one kernel for all parameters; fp32 moments like the master weights),
    # called without torch.optim, whose import of the compiler costs seconds per process (posae.optim).
    return AdamW(sae.parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)


def train_step(state: TrainState, store: ActivationStore, cfg: Config, seed: int, dtype: torch.dtype | None,
               want_metrics: bool) -> StepStats:
    """One optimizer step over `grad_accum` micro-batches; decoder rows stay unit-norm."""
    sae, opt, tcfg = state.sae, state.opt, cfg.train
    for group in opt.param_groups:
        group["lr"] = lr_at(state.step, tcfg)
    device = state.since_fired_K.device
    fired_K = torch.zeros(sae.k, dtype=torch.bool, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)  # one device sync a step, not one per micro-batch
    sums: dict[str, float] = {}
    for micro in range(tcfg.grad_accum):
        idx = batch_indices(len(store), tcfg.batch_size, seed, state.step * tcfg.grad_accum + micro)
        x_BD = store.normalised(idx).to(device, non_blocking=True)
        pos_B = torch.from_numpy(store.pos_N[idx].astype(np.int64)).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            # Cast once here: autocast would cast x again for every matmul that reads it.
            out = sae(x_BD if dtype is None else x_BD.to(dtype), pos_B)
        terms, err_sq_B, mass_K = objective(out, x_BD, pos_B, tcfg, state.step, store.seq_len)
        finite &= torch.isfinite(terms["total"].detach())
        (terms["total"] / tcfg.grad_accum).backward()
        fired_K |= mass_K > 0  # features are non-negative: a feature fired iff its batch total is positive
        if want_metrics:
            for k, v in {**{f"losses/{n}": t for n, t in terms.items()}, **batch_metrics(x_BD, out)}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, Tensor) else v) / tcfg.grad_accum
    sae.remove_parallel_grads_()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.normalise_decoder_()
    state.step += 1
    return StepStats(fired_K=fired_K, x_BD=x_BD, x_hat_BD=out.x_hat.detach(), err_sq_B=err_sq_B,
                     terms={k: v for k, v in sums.items() if k.startswith("losses/")},
                     metrics={k: v for k, v in sums.items() if not k.startswith("losses/")}, finite=bool(finite))


def objective(out: ForwardOutput, x_BD: Tensor, pos_B: Tensor, tcfg: TrainConfig, step: int,
              seq_len: int) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Eq. 7 plus the variant's terms; each token's squared error (for resampling); each feature's
    total activation in the batch (for dead-feature tracking, from the same pass as the L1).

    'total' = recon + λ1(step) · l1 + the variant's (already weighted) terms is what is minimised;
    'l1' is the unweighted ‖f‖₁ per token.
    """
    recon_B, err_sq_B = ReconLoss.apply(out.x_hat, x_BD, tcfg.recon_loss == "squared")
    if tcfg.position_weighted:
        recon_B = recon_B * position_weights(pos_B, seq_len)
    recon = recon_B.mean()
    # Features are non-negative in every variant, so ‖f‖₁ is a sum (no abs pass over [B, K]): of the
    # feature totals the decoder formed (`SAE.reconstruct`), whose gradient joins f's inside its product.
    mass_K = out.totals if out.totals is not None else out.features.sum(0).float()
    l1 = mass_K.sum() / out.features.shape[0]
    total = recon + l1_at(step, tcfg) * l1 + sum(out.aux_losses.values(), torch.zeros((), device=x_BD.device))
    return {"total": total, "recon": recon, "l1": l1, **out.aux_losses}, err_sq_B, mass_K.detach()


class ReconLoss(torch.autograd.Function):
    """Per-token ‖x̂ − x‖₂ (or its square), with a hand-written backward.

    Same numbers as autograd's vector_norm, in fewer passes over [B, D]: the error is formed once
    in fp32 (x̂ may be bf16 under autocast, x stays fp32) for an exact norm, and kept in x̂'s dtype
    for the backward, which is then one pass in that dtype (the gradient flows back as bf16 under
    autocast anyway). ~40% less time than autograd's version, ~3% of a d = 640 step. x̂ is cast
    before the subtraction: a mixed-dtype op on the CPU casts through a temporary of its own.
    Returns (loss_B, squared error_B); the second carries no gradient.
    """

    @staticmethod
    def forward(ctx, x_hat_BD: Tensor, x_BD: Tensor, squared: bool) -> tuple[Tensor, Tensor]:
        err_BD = torch.sub(x_hat_BD, x_BD) if x_hat_BD.dtype == x_BD.dtype else x_hat_BD.to(x_BD.dtype).sub_(x_BD)
        norm_B = torch.linalg.vector_norm(err_BD, dim=-1)
        ctx.squared = squared
        ctx.save_for_backward(err_BD.to(x_hat_BD.dtype), norm_B)
        err_sq_B = norm_B.square()
        ctx.mark_non_differentiable(err_sq_B)
        return (err_sq_B.clone() if squared else norm_B), err_sq_B

    @staticmethod
    def backward(ctx, grad_B: Tensor, _unused: Tensor) -> tuple[Tensor | None, None, None]:
        err_BD, norm_B = ctx.saved_tensors
        scale_B = 2.0 * grad_B if ctx.squared else grad_B / norm_B.clamp_min(1e-12)
        return err_BD * scale_B.to(err_BD.dtype)[:, None], None, None


def position_weights(pos_B: Tensor, seq_len: int) -> Tensor:
    """w_t = 1 + t/L (eq. 7), divided by its batch mean so the weights average 1 (docs/decisions.md §9)."""
    w_B = 1.0 + pos_B.float() / seq_len
    return w_B / w_B.mean()


@torch.no_grad()
def batch_metrics(x_BD: Tensor, out: ForwardOutput) -> dict[str, float]:
    """Reconstruction and sparsity on one batch, on the normalised scale (MSE 1.0 = predicting the mean)."""
    err_BD = out.x_hat.float() - x_BD
    f_BK = out.features
    sq_err = float(err_BD.square().sum())
    return {
        "metrics/mse": sq_err / err_BD.numel(),
        "metrics/explained_variance": 1.0 - sq_err / max(float((x_BD - x_BD.mean(0)).square().sum()), 1e-12),
        "metrics/l0": float((f_BK > 0).sum(dtype=torch.float32)) / f_BK.shape[0],
        # Mean activation per feature and token: the paper's "L1 < 0.1" fits this scale (docs/decisions.md §9).
        "metrics/l1": float(f_BK.sum(dtype=torch.float32)) / f_BK.numel(),
    }


# --------------------------------------------------------------------------- schedules (functions of the step)


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Linear warm-up over lr_warmup of the run, constant, linear decay to 0 over the last lr_decay."""
    factor = 1.0
    warm = tcfg.lr_warmup * tcfg.steps
    if warm > 0:
        factor = min(factor, (step + 1) / warm)
    decay = tcfg.lr_decay * tcfg.steps
    if decay > 0:
        factor = min(factor, (tcfg.steps - step) / decay)
    return tcfg.lr * factor


def lr_budget(tcfg: TrainConfig) -> float:
    """Σ_t lr_t over the run's optimizer steps: how far AdamW can move one parameter element.

    Adam's update is lr · m̂/(√v̂ + ε), and |m̂/√v̂| is about 1 at most while gradients keep their sign
    (exactly 1 on the first step), so no element of a learned table can be expected to travel
    much further than this (docs/decisions.md, "Variants as the design reads"). A function of the
    training config alone; gradient accumulation does not change it (one optimizer step per step).
    """
    return math.fsum(lr_at(step, tcfg) for step in range(tcfg.steps))


def l1_at(step: int, tcfg: TrainConfig) -> float:
    """λ1 · l1_scale, ramped linearly from 0 over the first l1_warmup of the run."""
    warm = tcfg.l1_warmup * tcfg.steps
    ramp = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    return tcfg.l1 * tcfg.l1_scale * ramp


def resample_threshold(tcfg: TrainConfig) -> int:
    """Optimizer steps without firing after which a feature is resampled (paper: 50k of 100k)."""
    return max(1, math.floor(tcfg.resample_after * tcfg.steps))


def is_log_step(step: int, tcfg: TrainConfig) -> bool:
    return step == 1 or step % tcfg.log_every == 0 or step == tcfg.steps


# --------------------------------------------------------------------------- data


def batch_indices(n_tokens: int, batch_size: int, seed: int, micro: int) -> np.ndarray:
    """Rows of micro-batch number `micro`: epochs of a seeded permutation, sorted for memmap locality."""
    per_epoch = n_tokens // batch_size
    epoch, j = divmod(micro, per_epoch)
    perm = _permutation(n_tokens, seed, epoch)
    return np.sort(perm[j * batch_size : (j + 1) * batch_size])


@functools.lru_cache(maxsize=4)
def _permutation(n_tokens: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_tokens)


def check_batch(cfg: Config, store: ActivationStore) -> None:
    if cfg.train.batch_size > len(store):
        raise ConfigError(f"{cfg.source}: train.batch_size {cfg.train.batch_size} exceeds the {len(store)} training "
                          f"tokens of {store.path}. Fix: lower train.batch_size")


def autocast_dtype(tcfg: TrainConfig, device: torch.device | str = "cpu") -> torch.dtype | None:
    """bfloat16 where `device` computes it natively (else it is slower than fp32); None = plain fp32."""
    if tcfg.dtype == "float32":
        return None
    if tcfg.dtype == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if models.has_native_bf16(torch.device(device)) else None


# --------------------------------------------------------------------------- dead features


@torch.no_grad()
def maybe_resample(state: TrainState, stats: StepStats, tcfg: TrainConfig, seed: int) -> int:
    """Count steps since each feature fired; resample those inactive for more than the threshold.

    A revived feature's slice of every per-feature parameter (`SAE.feature_params`: gate or mask
    logits, attention-routing output columns, encoder bias, ...) goes back to its initial value, and
    the AdamW moments (exp_avg, exp_avg_sq) of exactly those slices to zero; the rest of the model
    and every live feature are left as they are. The encoder and decoder then point at high-loss
    inputs (tokens drawn with probability ∝ squared error): decoder row = the direction of that
    token's residual x − x̂, encoder column = the same times 0.2 × the mean norm of the live encoder
    columns. This is Anthropic's 2023 recipe with the residual in place of the input: on Gemma's
    residual stream, inputs share one massive dimension, so input-direction features all fired
    together on half the tokens and training diverged (calibration, lr 3e-3); residuals add what is
    missing. The draw is seeded by (seed, step), so a resumed run resamples exactly as an
    uninterrupted one.
    """
    state.since_fired_K += 1
    state.since_fired_K[stats.fired_K] = 0
    if not tcfg.resample:
        return 0
    dead_K = state.since_fired_K > resample_threshold(tcfg)
    n_dead = int(dead_K.sum())
    if n_dead == 0:
        return 0
    dead_idx = dead_K.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed * 1_000_003 + state.step)
    # Drawn on the CPU with a CPU generator, so a GPU run resamples the same rows as a CPU run would.
    weights_B = stats.err_sq_B.float().cpu().clamp_min(0) + 1e-12
    rows = torch.multinomial(weights_B, n_dead, replacement=n_dead > weights_B.numel(), generator=g)
    rows = rows.to(stats.x_BD.device)
    dirs_ND = torch.nn.functional.normalize(stats.x_BD[rows] - stats.x_hat_BD[rows].float(), dim=-1)
    sae = state.sae
    alive = ~dead_K
    enc_norm = float(sae.W_enc_DK[:, alive].norm(dim=0).mean()) if bool(alive.any()) else 1.0
    for name, axis, features in sae.feature_params():
        local = dead_idx[(dead_idx >= features.start) & (dead_idx < features.stop)] - features.start
        if local.numel() == 0:
            continue
        param = sae.get_parameter(name)
        param.index_copy_(axis, local, state.initial.get_parameter(name).index_select(axis, local))
        moments = state.opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                moments[key].index_fill_(axis, local, 0.0)
    sae.W_dec_KD[dead_idx] = dirs_ND
    sae.W_enc_DK[:, dead_idx] = dirs_ND.T * (0.2 * enc_norm)
    state.since_fired_K[dead_idx] = 0
    state.resampled_K |= dead_K
    return n_dead


# --------------------------------------------------------------------------- the step budget


@torch.no_grad()
def table_movement(sae: SAE, initial: SAE) -> dict[str, float]:
    """Each learned per-position table (`SAE.position_tables`) now and against its initial value.

    Keys ``tables/<name>/mean`` and ``/std`` (of the table's values), ``/max_abs_change`` and
    ``/mean_abs_change`` (of |now − initial| over its elements); {} for a variant without tables.
    """
    out = {}
    start = initial.position_tables()
    for name, table in sae.position_tables().items():
        now = table.detach().float()
        change = (now - start[name].detach().float().to(now.device)).abs()
        out.update({f"tables/{name}/mean": float(now.mean()), f"tables/{name}/std": float(now.std()),
                    f"tables/{name}/max_abs_change": float(change.max()),
                    f"tables/{name}/mean_abs_change": float(change.mean())})
    return out


def record_budget(state: TrainState, tcfg: TrainConfig) -> None:
    """Add the step budget and the tables' movement to the run's final metrics record.

    ``budget/lr_sum`` is `lr_budget` (Σ_t lr_t, the most AdamW can move one element in this run);
    the ``tables/...`` keys are `table_movement`. A table whose max_abs_change is near the budget
    was still moving when the run ended: where it would have settled cannot be judged from this run.
    """
    last = state.metrics[-1]
    if last["step"] != state.step:  # the last step is always logged (`is_log_step`)
        raise RuntimeError(f"the final metrics record is of step {last['step']}, not the last step {state.step}")
    last.update({"budget/lr_sum": lr_budget(tcfg), **table_movement(state.sae, state.initial)})


# --------------------------------------------------------------------------- logging


def maybe_log(state: TrainState, stats: StepStats, tcfg: TrainConfig, tokens_per_step: int,
              clock: dict[str, float], bar) -> None:
    if bar is not None:
        bar.update(tokens_per_step)
    if not is_log_step(state.step, tcfg):
        return
    now = time.perf_counter()
    steps_done = state.step - clock["step"]
    k = state.sae.k
    line = {
        "step": state.step,
        "tokens": state.step * tokens_per_step,
        **stats.terms,
        **stats.metrics,
        "metrics/dead_fraction": float((state.since_fired_K >= tcfg.dead_window).sum()) / k,
        "metrics/resampled_fraction": float(state.resampled_K.sum()) / k,
        "metrics/lr": lr_at(state.step - 1, tcfg),
        **{f"metrics/{n}": v for n, v in state.sae.diagnostics().items()},
        "perf/tokens_per_s": steps_done * tokens_per_step / max(now - clock["t"], 1e-9),
    }
    state.metrics.append(line)
    clock["t"], clock["step"] = now, state.step
    if bar is not None:
        bar.set_postfix(loss=f"{line['losses/total']:.3g}", l0=f"{line['metrics/l0']:.0f}",
                        ev=f"{line['metrics/explained_variance']:.3f}", refresh=False)


def progress_bar(enabled: bool, desc: str, tcfg: TrainConfig, tokens_per_step: int, step: int):
    """A context manager giving a bar counting tokens (so its rate is tokens/s), or None."""
    if not enabled:
        return contextlib.nullcontext()
    from posae.progress import bar

    return bar(total=tcfg.steps * tokens_per_step, initial=step * tokens_per_step, desc=desc, unit="tok",
               unit_scale=True)


@contextlib.contextmanager
def threads_for(sae: SAE, tcfg: TrainConfig) -> Iterator[None]:
    """One thread for a tiny SAE (smoke runs, tests), all of them otherwise.

    Below ~1 GFLOP per step the thread team's synchronisation costs more than it saves, and on a
    busy machine every parallel op waits for a descheduled worker: a 64-wide smoke SAE ran 100x
    slower on two threads than on one while another process held a core.
    """
    before = torch.get_num_threads()
    if 10 * tcfg.batch_size * sae.d_model * sae.k < 1e9:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- checkpoints


def maybe_checkpoint(state: TrainState, out: Path, info: dict, store: ActivationStore, tcfg: TrainConfig) -> None:
    if state.step % tcfg.checkpoint_every == 0 and state.step < tcfg.steps:
        save_checkpoint(state, out, info, store, done=False)


def save_checkpoint(state: TrainState, out: Path, info: dict, store: ActivationStore, done: bool) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in state.sae.parameters()):
        raise diverged(state.step, info, out)  # never replace a good checkpoint with NaN weights
    info = {**info, "step": state.step, "done": done,
            "resampled_fraction": float(state.resampled_K.sum()) / state.sae.k}
    mean_D = torch.from_numpy(np.asarray(store.mean_D, dtype=np.float32))
    checkpoint.save_run(out, state.sae, info, state.metrics, mean_D, None if done else train_tensors(state))


def diverged(step: int, info: dict[str, Any], out: Path) -> TrainingDiverged:
    """The error for a NaN or infinite loss at `step`, saying which checkpoint is kept."""
    try:
        kept = checkpoint.check_run(out)
    except checkpoint.CorruptRun:
        kept = None  # not a checkpoint to resume from
    if kept is not None and kept.get("run_hash") == info["run_hash"]:
        where = f"the last good checkpoint (step {kept['step']}) is kept in {out}"
    else:
        where = f"no checkpoint of this run was written ({out} is left as it was)"
    return TrainingDiverged(
        f"{info['variant']} layer {info['layer']} seed {info['seed']}: the loss or the weights turned NaN or infinite "
        f"at step {step}, so training stopped without saving them; {where}. Fix: lower train.lr (now {info['config']['train']['lr']:g}) "
        f"or lengthen train.lr_warmup, and check the activation store {info['store']['path']} for extreme values "
        "(abs_max in its meta.json)")


def train_tensors(state: TrainState) -> dict[str, Tensor]:
    """The optimizer moments and feature counters, keyed by parameter name."""
    tensors = {"since_fired_K": state.since_fired_K.cpu().clone(), "resampled_K": state.resampled_K.cpu().to(torch.uint8)}
    for name, p in state.sae.named_parameters():
        for key, value in state.opt.state.get(p, {}).items():
            tensors[f"opt.{name}.{key}"] = value.detach().clone().reshape(value.shape)
    return tensors


def resume(out: Path, ident: str, cfg: Config, variant: str, seed: int, store: ActivationStore,
           device: torch.device | str = "cpu") -> TrainState | None:
    """The state of an unfinished run of the same identity saved in `out`, else None (start afresh, also
    when a file of `out` is not what its config.json records: `is_finished` said which)."""
    try:
        info = checkpoint.check_run(out)
    except checkpoint.CorruptRun:
        return None
    if info is not None and info.get("variant") != variant:
        raise checkpoint.CheckpointMismatch(
            f"{out}: this run folder holds a {info.get('variant')} SAE, not {variant}, and training {variant} here "
            f"would replace it. Fix: train {variant} into its own folder (posae.paths.sae_dir), or delete {out} "
            f"if the {info.get('variant')} run is not wanted")
    tensors = checkpoint.read_train_state(out)
    if info is None or tensors is None or info.get("run_hash") != ident or info.get("done"):
        return None
    state = start(cfg, variant, seed, store, device)
    state.sae.load_state_dict(checkpoint.load_sae(out).state_dict())
    opt_state = {}
    for i, (name, p) in enumerate(state.sae.named_parameters()):
        keys = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if keys:
            opt_state[i] = keys
    sd = state.opt.state_dict()
    sd["state"] = opt_state
    state.opt.load_state_dict(sd)
    state.since_fired_K = tensors["since_fired_K"].to(device).clone()
    state.resampled_K = tensors["resampled_K"].bool().to(device)
    state.step = int(info["step"])
    state.metrics = checkpoint.read_metrics(out)
    return state


def is_finished(out: Path, ident: str, say: bool = False) -> bool:
    """`out` holds the finished run `ident`, every file as its config.json records (`checkpoint.check_run`).

    A truncated or edited file, or a config.json naming another run than its path, is not finished: the
    run is trained again (resumed when its checkpoint checks out); with `say`, one line on stderr says why.
    """
    try:
        info = checkpoint.check_run(out)
    except checkpoint.CorruptRun as e:
        if say:
            print(f"posae: training a run again: {reason(e)}", file=sys.stderr, flush=True)
        return False
    return bool(info and info.get("done") and info.get("run_hash") == ident)


def run_hash(cfg: Config, variant: str, layer: int, seed: int, store: ActivationStore) -> str:
    """What determines the trained weights: a changed value retrains, bookkeeping settings do not."""
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in ("seeds", "checkpoint_every", "log_every")}
    blob = {"variant": variant, "layer": layer, "seed": seed, "sae": to_dict(cfg.sae), "train": train,
            "store": store.meta.get("hash"), "tokens": len(store), "format": checkpoint.FORMAT_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def run_info(cfg: Config, variant: str, layer: int, seed: int, store: ActivationStore, ident: str,
             state: TrainState, out: Path) -> dict[str, Any]:
    """config.json: what rebuilds the SAE and says where it came from."""
    sae = state.sae
    old = checkpoint.read_info(out) if state.step else None
    return {
        "variant": variant, "layer": layer, "seed": seed,
        "d_model": sae.d_model, "k": sae.k, "seq_len": sae.seq_len,
        "groups": {n: [r.start, r.stop] for n, r in sae.groups.items()} if sae.groups else None,
        "config": to_dict(cfg), "config_source": cfg.source,
        "normalisation": {"centred": True, "scale": store.scale, "mean": f"{checkpoint.WEIGHTS}:normalisation.mean_D"},
        "store": {"path": str(store.path), "hash": store.meta.get("hash"), "tokens": len(store)},
        "device": sae.b_dec_D.device.type,
        "autocast": str(autocast_dtype(cfg.train, sae.b_dec_D.device) or "float32").replace("torch.", ""),
        "diagnostics_start": (old or {}).get("diagnostics_start", sae.diagnostics()),
        "train_seconds": (old or {}).get("train_seconds", 0.0),
        "run_hash": ident, "git_commit": provenance.git_commit(), "posae_version": posae.__version__,
        "torch_version": torch.__version__, "steps": cfg.train.steps,
    }
