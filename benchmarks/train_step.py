"""Training-step throughput: every posae variant, a hand-written ReLU SAE, SAELens, and the matmul peaks.

All on the same in-memory activations (the default config's layer-8 training store when it has
been captured, else Gaussian data of the same shape), d = 640, batch 4096 tokens (`--batch`; the
default config trains with 1024), k = 640 and 2560 (`--k`), in one process so that the figures
share the machine's state. Timings interleave the contenders round by round and keep each one's
best round, which is robust to other processes borrowing a core for a moment. Prints Markdown
tables for benchmarks/README.md.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'    # SAELens, after the pinned torch
    .venv/bin/python benchmarks/train_step.py                  # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/train_step.py --threads 1 --batch 1024 --k 640 --posae-only
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from posae import memory, provenance, train
from posae.checks import load_config
from posae.config import Config, SAEConfig, TrainConfig
from posae.data import models
from posae.data.store import ActivationStore, StoreError
from posae.paths import activations_dir
from posae.saes import REGISTRY, variant_config

D, T = 640, 128
B = 4096  # tokens per step; --batch sets it


def memory_store(bits_ND: np.ndarray, storage_dtype: str, mean_D: np.ndarray, scale: float, pos_N: np.ndarray,
                 seq_len: int) -> ActivationStore:
    """An ActivationStore over arrays in memory, so a step here runs the real store's gather
    (`ActivationStore.normalised`), less only page-cache misses: a memory map's pages are resident after
    one epoch. `bits_ND` holds the 16-bit patterns of `storage_dtype` ("float16" or "bfloat16")."""
    n, d = bits_ND.shape
    zeros = np.zeros(n, np.int32)
    meta = {"count": n, "d_model": d, "scale": scale, "seq_len": seq_len, "storage_dtype": storage_dtype,
            "hash": "memory"}
    arrays = {"acts": bits_ND, "tokens": zeros, "pos": np.asarray(pos_N), "seq": zeros}
    return ActivationStore(Path("<memory>"), meta, arrays, np.asarray(mean_D, np.float32))


def subset(store: ActivationStore, rows: slice) -> ActivationStore:
    return memory_store(store.acts_ND[rows], store.meta["storage_dtype"], store.mean_D, store.scale,
                        store.pos_N[rows], store.seq_len)


def activations(n_tokens: int) -> tuple[ActivationStore, str]:
    try:
        cfg = load_config("default", check_model=False)
        store = ActivationStore.open(activations_dir(cfg.name, 8, "train"))
        n = min(n_tokens, len(store))
        return memory_store(np.array(store.acts_ND[:n]), store.meta["storage_dtype"], store.mean_D, store.scale,
                            np.array(store.pos_N[:n]), store.seq_len), \
            f"default layer 8 training activations ({n:,} tokens)"
    except StoreError:
        g = torch.Generator().manual_seed(0)
        pos_N = np.tile(np.arange(1, T), n_tokens // (T - 1) + 1)[:n_tokens].astype(np.int32)
        bits_ND = torch.randn(n_tokens, D, generator=g).half().view(torch.int16).numpy()
        return memory_store(bits_ND, "float16", np.zeros(D, np.float32), 1.0, pos_N, T), \
            f"Gaussian activations ({n_tokens:,} tokens; run notebook 01 for real ones)"


CLOCK = time.perf_counter  # --clock cpu: time.thread_time


def best_seconds(contenders: dict[str, Callable[[int], None]], rounds: int, reps: int) -> dict[str, float]:
    """Seconds per step of each contender (`fn(n)` runs n steps): best round of `reps` steps, rounds interleaved."""
    for fn in contenders.values():
        fn(1)  # warm-up: allocations, oneDNN kernel selection
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = CLOCK()
            fn(reps)
            best[name] = min(best[name], (CLOCK() - t0) / reps)
    return best


def repeat(step: Callable[[], None]) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            step()

    return run


def matmul_peaks(k: int, dtypes: tuple[torch.dtype, ...]) -> dict[str, float]:
    """GFLOP/s of the SAE step's own matmul shapes ([B,D]x[D,K], [B,K]x[K,D], [D,B]x[B,K]), best of them."""
    out = {}
    for dtype in dtypes:
        shapes = [(B, D, k), (B, k, D), (D, B, k)]
        mats = [(torch.randn(m, n, dtype=dtype), torch.randn(n, p, dtype=dtype)) for m, n, p in shapes]
        fns = {str(s): repeat(lambda a=a, b=b: a @ b) for s, (a, b) in zip(shapes, mats)}
        secs = best_seconds(fns, rounds=3, reps=5)
        out[str(dtype).replace("torch.", "")] = max(2 * m * n * p / secs[str((m, n, p))] / 1e9 for m, n, p in shapes)
    return out


def step_matmul_floor(k: int, dtype: torch.dtype) -> tuple[float, dict[str, float]]:
    """Seconds of the baseline step's five products in the layouts the step runs them, and each one's GFLOP/s.

    The forward's x W_enc and f W_dec, the input gradient g W_dec^T (a transposed view, as autograd
    passes it), and the two weight gradients x^T g and f^T g, whose left operand is the transpose of a
    row-major [B, .] batch: `matmul_peaks` times that shape on a contiguous [D, B] operand, which the
    step never has. The sum is what the step would take with nothing but its matmuls.
    """
    g = torch.Generator().manual_seed(0)
    x, f = torch.randn(B, D, generator=g).to(dtype), torch.randn(B, k, generator=g).to(dtype)
    g_x, g_f = torch.randn(B, D, generator=g).to(dtype), torch.randn(B, k, generator=g).to(dtype)
    W_enc, W_dec = torch.randn(D, k, generator=g).to(dtype), torch.randn(k, D, generator=g).to(dtype)
    products = {"x W_enc": lambda: x @ W_enc, "f W_dec": lambda: f @ W_dec, "g W_dec^T": lambda: g_x @ W_dec.T,
                "x^T g (weight gradient)": lambda: x.T @ g_f, "f^T g (weight gradient)": lambda: f.T @ g_x}
    secs = best_seconds({name: repeat(fn) for name, fn in products.items()}, rounds=3, reps=5)
    return sum(secs.values()), {name: 2 * B * D * k / s / 1e9 for name, s in secs.items()}


def emulated_bf16_gflops() -> float:
    """One [1024, 640] x [640, 640] bf16 product's GFLOP/s: what torch does without bf16 units (emulation)."""
    a, b = torch.randn(1024, D, dtype=torch.bfloat16), torch.randn(D, D, dtype=torch.bfloat16)
    a @ b
    t0 = time.perf_counter()
    a @ b
    return 2 * 1024 * D * D / (time.perf_counter() - t0) / 1e9


def plain_step(store: ActivationStore, k: int, bf16: bool) -> Callable[[int], None]:
    """A minimal hand-written ReLU SAE step (the reference's 'plain loop')."""
    g = torch.Generator().manual_seed(0)
    W_enc = torch.nn.Parameter(torch.randn(D, k, generator=g) / D**0.5)
    W_dec = torch.nn.Parameter(torch.randn(k, D, generator=g) / k**0.5)
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(k)), torch.nn.Parameter(torch.zeros(D))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-4)
    x = store.normalised(np.arange(B))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            f = torch.relu((x - b_dec) @ W_enc + b_enc)
            x_hat = f @ W_dec + b_dec
        loss = (x_hat.float() - x).pow(2).sum(-1).mean() + 0.1 * f.float().sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return repeat(step)


def saelens_fit(store: ActivationStore, k: int, autocast: bool) -> Callable[[int], None]:
    """SAELens's StandardTrainingSAE through its own SAETrainer.fit (one fit of n steps per call)."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    x = store.normalised(np.arange(B))
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D, d_sae=k, l1_coefficient=0.1))

    def fit(steps: int) -> None:
        # lr_end as LanguageModelSAERunnerConfig derives it (lr / 10); every other setting its default.
        trainer_cfg = SAETrainerConfig(total_training_samples=steps * B, train_batch_size_samples=B,
                                       lr=3e-4, lr_end=3e-5, autocast=autocast, device="cpu")
        with open("/dev/null", "w") as null, contextlib.redirect_stderr(null):  # its tqdm bar
            SAETrainer(trainer_cfg, sae, data_provider=iter(lambda: x, None)).fit()

    return fit


def posae_step(store: ActivationStore, variant: str, k: int, dtype: torch.dtype | None) -> Callable[[int], None]:
    cfg = Config(sae=SAEConfig(expansion=k / D), train=TrainConfig(batch_size=B, steps=10**6))
    cfg = variant_config(cfg, variant)
    state = train.start(cfg, variant, 0, store)
    return repeat(lambda: train.train_step(state, store, cfg, 0, dtype, want_metrics=False))


def final_mse(dtype: torch.dtype | None, fallback: ActivationStore) -> tuple[float, str]:
    """Validation MSE of the baseline trained as the default config trains it, with autocast `dtype`.

    On the default layer-8 stores when captured (the default's batch, steps and schedule), else on
    the Gaussian data with held-out tokens. Same seed, so same initialisation and data order.
    """
    cfg = load_config("default", check_model=False)
    try:
        train_store = ActivationStore.open(activations_dir(cfg.name, 8, "train"))
        val = ActivationStore.open(activations_dir(cfg.name, 8, "val"))
        idx = np.linspace(0, len(val) - 1, 16384).astype(np.int64)
        x_BD, pos_N, where = val.normalised(idx), val.pos_N[idx], "default layer 8, 16k validation tokens"
    except StoreError:
        n = len(fallback) - B
        train_store = subset(fallback, slice(0, n))
        x_BD, pos_N = fallback.normalised(np.arange(n, len(fallback))), fallback.pos_N[n:]
        where = "Gaussian data, held-out tokens"
    vcfg = variant_config(cfg, "baseline")
    state = train.start(vcfg, "baseline", 0, train_store)
    for _ in range(vcfg.train.steps):
        stats = train.train_step(state, train_store, vcfg, 0, dtype, want_metrics=False)
        train.maybe_resample(state, stats, vcfg.train, 0)
    pos_B = torch.from_numpy(np.asarray(pos_N, dtype=np.int64))
    with torch.no_grad():
        return float((state.sae(x_BD, pos_B).x_hat - x_BD).square().mean()), where


def main() -> None:
    global B, CLOCK
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores). On a shared "
                    "machine 1 is far steadier: a two-thread op waits whenever another process holds a core")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="steps per round")
    ap.add_argument("--batch", type=int, default=B, help="tokens per step (the default config trains with 1024)")
    ap.add_argument("--k", type=int, nargs="+", default=[640, 2560], help="dictionary sizes")
    ap.add_argument("--posae-only", action="store_true", help="only posae's variants: no plain loop, no SAELens, "
                    "no reconstruction check")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this thread's CPU time, which "
                    "a process holding the other core does not inflate (with --threads 1 on a shared machine)")
    args = ap.parse_args()
    B = args.batch
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    memory.keep_freed_memory()  # as a training run does; every contender shares the process
    store, source = activations(B * 16)
    bf16 = train.autocast_dtype(TrainConfig())  # None without bf16 units: training runs in float32 there
    native = models.cpu_has_native_bf16()
    print(f"# Training step, d={D}, batch {B} tokens; {source}; {args.clock} clock")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {provenance.cpu_model()} "
          f"({' '.join(provenance.cpu_bf16_features()) or 'no bf16 units'}), native bf16: {native}\n")
    if not native:
        print(f"No bf16 units: torch emulates bf16 matmuls ({emulated_bf16_gflops():.1f} GFLOP/s on one "
              "[1024, 640] x [640, 640] product), so posae trains in float32 here. The bf16 contenders are "
              "skipped, and the peak below is float32's.\n")
    peak_dtype = "bfloat16" if native else "float32"

    rows = []
    for k in args.k:
        peaks = matmul_peaks(k, (torch.float32, torch.bfloat16) if native else (torch.float32,))
        contenders = {} if args.posae_only else {
            "plain ReLU SAE, fp32": plain_step(store, k, False),
            "SAELens StandardTrainingSAE, default (fp32)": saelens_fit(store, k, False),
        }
        if native and not args.posae_only:
            contenders["plain ReLU SAE, bf16 autocast"] = plain_step(store, k, True)
            contenders["SAELens StandardTrainingSAE, autocast bf16"] = saelens_fit(store, k, True)
        if native:
            contenders["posae baseline, fp32"] = posae_step(store, "baseline", k, None)
        contenders.update({f"posae {v}": posae_step(store, v, k, bf16) for v in sorted(REGISTRY)})
        secs = best_seconds(contenders, args.rounds, args.reps)
        base = secs["posae baseline"]
        flops = 10 * B * D * k  # 2 forward + 3 backward matmuls of 2·B·D·k (SAE.pre_acts avoids a 6th)
        for name, s in secs.items():
            rows.append({"k": k, "step": name, "ms": 1e3 * s, "ktok_s": B / s / 1e3, "vs_baseline": s / base})
        print(f"## k = {k}\n")
        print("matmul peaks on the step's shapes: " + ", ".join(
            f"{'fp32' if d == 'float32' else 'bf16'} {v:.0f} GFLOP/s" for d, v in peaks.items()) + "\n")
        print("| step | ms | k tokens/s | time vs posae baseline |\n|---|---:|---:|---:|")
        for r in rows:
            if r["k"] == k:
                print(f"| {r['step']} | {r['ms']:.1f} | {r['ktok_s']:.1f} | {r['vs_baseline']:.2f}x |")
        against = ""
        if not args.posae_only:
            sl_default = secs["SAELens StandardTrainingSAE, default (fp32)"]
            sl_best = min(sl_default, secs.get("SAELens StandardTrainingSAE, autocast bf16", sl_default))
            against = f"{sl_default / base:.2f}x SAELens default, {sl_best / base:.2f}x its fastest setting; "
        print(f"\nposae baseline: {against}"
              f"matmul FLOPs at {flops / base / 1e9:.0f} GFLOP/s = {flops / base / 1e9 / peaks[peak_dtype]:.0%} "
              f"of the {'bf16' if native else 'fp32'} peak; slowest variant {max(r['vs_baseline'] for r in rows if r['k'] == k and r['step'].startswith('posae') and 'fp32' not in r['step']):.2f}x the baseline\n")
        floor, rates = step_matmul_floor(k, torch.bfloat16 if native else torch.float32)
        print(f"the baseline's five products in the step's own layouts: {1e3 * floor:.1f} ms, "
              f"{flops / floor / 1e9:.0f} GFLOP/s = {flops / floor / 1e9 / peaks[peak_dtype]:.0%} of the peak ("
              + ", ".join(f"{n} {v:.0f}" for n, v in rates.items()) + " GFLOP/s). With nothing but them the step "
              f"would reach that share; the rest of the step takes {1e3 * (base - floor):.1f} ms\n")

    if args.posae_only or not native:
        return
    (fp32, where), (low, _) = final_mse(None, store), final_mse(bf16, store)
    steps = load_config("default", check_model=False).train.steps
    print(f"## Reconstruction after training (baseline as params/default.yaml trains it: {steps} steps, seed 0; {where})\n")
    print(f"fp32 MSE {fp32:.4f}, bf16 autocast MSE {low:.4f}: bf16 is {low / fp32 - 1:+.2%} against fp32")


if __name__ == "__main__":
    main()
