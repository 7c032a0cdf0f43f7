"""Capture benchmark: matmul peaks, forward throughput against the naive way, load times, peak RSS.

    .venv/bin/python benchmarks/capture.py [--threads N] [--quick]

Everything runs offline on the default config's model (Gemma 3 270M) and layers (3, 8, 13), in one
run so that the ratios compare like with like. Prints a Markdown report for benchmarks/README.md.
Targets (issue 3): capture >= 2,500 tokens/s and >= 8x the naive way, warm load <= 5 s, peak RSS
<= 2.5 GiB and not growing with the number of tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from posae import memory
from posae.checks import load_config
from posae.data import capture as cap
from posae.data import corpus, models

GiB = 2**30


def matmul_peak(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best GFLOP/s of square matmuls at a few sizes (the model's own matmuls are ~2048 x 640 x 2048)."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up: oneDNN picks its kernel on the first call
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def forward_shape_peak(model, tokens: int, seconds: float = 2.0) -> float:
    """GFLOP/s of the forward's own matmuls: every nn.Linear of one decoder block (attention projections, MLP)
    applied to a batch of `tokens` rows in the model's dtype, back to back, as the forward runs them.
    The limit of an early-exit forward whose time were all matmul (its blocks are alike)."""
    block = cap.decoder_layers(model)[0]
    weights = [m.weight for m in block.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(tokens, w.shape[1], dtype=w.dtype) for w in weights}
    flops = sum(2 * tokens * w.shape[0] * w.shape[1] for w in weights)
    with torch.inference_mode():
        for w in weights:  # warm-up: oneDNN picks (and caches) each shape's kernel
            torch.nn.functional.linear(xs[w.shape[1]], w)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)
            reps += 1
    return flops * reps / (time.perf_counter() - t0) / 1e9


def forward_rate(model, seqs_SL, batch_size: int, n_batches: int, layers, naive: bool) -> float:
    """Tokens/s of the forward alone: early exit with hooks, or the full model with output_hidden_states."""
    batches = [torch.from_numpy(seqs_SL[i * batch_size:(i + 1) * batch_size]).long() for i in range(n_batches + 1)]
    with torch.inference_mode(), cap.layer_outputs(model, layers, stop=not naive):
        def step(ids_BL):
            if naive:
                hs = model(input_ids=ids_BL, output_hidden_states=True, use_cache=False).hidden_states
                [hs[layer + 1] for layer in layers]
            else:
                cap.run_to(model, ids_BL)

        step(batches[0])  # warm-up
        t0 = time.perf_counter()
        for ids_BL in batches[1:]:
            step(ids_BL)
        dt = time.perf_counter() - t0
    return sum(b.numel() for b in batches[1:]) / dt


_CAPTURE_CHILD = """
import dataclasses, json, sys, threading, time
import psutil
import torch
if sys.argv[2] != "0":
    torch.set_num_threads(int(sys.argv[2]))
from posae.data import models
from posae.data.capture import capture
from posae.checks import load_config

base = load_config("default")
n = int(sys.argv[1])
cfg = dataclasses.replace(base, name=f"bench-{n}", corpus=dataclasses.replace(base.corpus, n_train=n, n_val=n))
marks, loop_rss, samples = {}, [0], []
def peak_rss():  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
load = models.load_model
def sample_rss():  # the loop's own peak: ru_maxrss alone would be the model load's
    proc = psutil.Process()
    while "done" not in marks:
        rss = proc.memory_info().rss
        anon = int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) * 1024
        loop_rss[0] = max(loop_rss[0], rss)
        samples.append((time.perf_counter(), rss, anon))
        time.sleep(0.05)
def timed_load(*a, **k):
    out = load(*a, **k)
    marks["loaded"] = time.perf_counter()
    threading.Thread(target=sample_rss, daemon=True).start()
    return out
models.load_model = timed_load
t0 = time.perf_counter()
capture(cfg, progress=False)
t1 = time.perf_counter()
marks["done"] = True
tokens = 2 * n * base.corpus.seq_len
# The loop runs at a steady rate, so its halves in time are its halves in tokens.
half = (marks["loaded"] + t1) / 2
halves = [max((r for t, r, a in samples if (t < half) == first), default=0) for first in (True, False)]
# Anonymous memory alone: the rest of RSS is the memory-mapped model file, whose embedding rows fault in as new
# token ids arrive, bounded by the file (capture_rss.py --modes capture splits the two).
anon = [max((a for t, r, a in samples if (t < half) == first), default=0) for first in (True, False)]
print(json.dumps({"tokens": tokens, "total_s": t1 - t0, "loop_tok_s": tokens / (t1 - marks["loaded"]),
                  "peak_rss": peak_rss(), "loop_rss": loop_rss[0], "rss_halves": halves, "anon_halves": anon}))
"""


def capture_run(n_per_split: int, runs: Path, threads: int) -> dict:
    """A whole capture of n train + n val sequences in a fresh process: its tokens/s and peak RSS."""
    env = {**os.environ, "POSAE_RUNS": str(runs)}
    out = subprocess.run([sys.executable, "-c", _CAPTURE_CHILD, str(n_per_split), str(threads)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and smaller corpora (a check, not a figure)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default, one per core); 1 is reproducible on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    memory.keep_freed_memory()  # as capture() does: every contender (the naive forward too) and the limit share it
    scale = 1 if args.quick else 2
    cfg = load_config("default")
    layers = list(cfg.capture.layers)
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU native bf16: "
          f"{models.cpu_has_native_bf16()}, load average at start {load_before[0]:.2f}", file=sys.stderr)

    # The throughput figures come first and quickly: on a shared machine, a quiet window is short.
    # Capture's default dtype is bf16 where the CPU has bf16 units; elsewhere torch would emulate bf16 (slower
    # than float32 by ~45x on an AVX2-only EPYC), capture runs in float32, and that is what is measured.
    native = models.cpu_has_native_bf16()
    low, lo = ("bfloat16", "bf16") if native else ("float32", "fp32")
    peaks = {"float32": matmul_peak(torch.float32)}
    if native:
        peaks["bfloat16"] = matmul_peak(torch.bfloat16)
    models.gemma3_cache()  # the real cache exists before the warm timing
    t0 = time.perf_counter()
    tok = models.load_tokenizer(cfg.model)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp32 = models.load_model(dataclasses.replace(cfg.model, dtype="float32"), tokenizer=tok)
    t_model = time.perf_counter() - t0
    seqs = corpus.load_sequences(dataclasses.replace(cfg.corpus, n_train=16 * 9 * scale, n_val=1), tok).train_SL
    bs = cfg.capture.batch_size
    rates = {"naive": forward_rate(fp32.model, seqs, bs, scale, layers, naive=True),
             "fp32_early": forward_rate(fp32.model, seqs, bs, 2 * scale, layers, naive=False)}
    if native:
        del fp32
        bf16 = models.load_model(dataclasses.replace(cfg.model, dtype="bfloat16"), tokenizer=tok)
        rates["bf16_early"] = forward_rate(bf16.model, seqs, bs, 4 * scale, layers, naive=False)
    else:
        bf16, rates["bf16_early"] = fp32, rates["fp32_early"]  # the default forward is the float32 one
    shape_peak = forward_shape_peak(bf16.model, bs * seqs.shape[1])
    n_early = cap.params_run(bf16.model, max(layers))
    n_full = cap.params_run(bf16.model, bf16.info.num_layers - 1) + bf16.model.lm_head.weight.numel()
    del bf16
    load_mid = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="posae-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        models.build_gemma3_cache(tmp / "cold-cache")  # assemble GGUF, dequantise, save safetensors + tokenizer
        cold = time.perf_counter() - t0
        small, large = (50, 200) if args.quick else (100, 1000)
        runs = [capture_run(n, tmp / "runs", args.threads) for n in (small, large)]
    load_after = os.getloadavg()

    def mfu(rate: float, params: int, dtype: str) -> float:
        return 2 * params * rate / (peaks[dtype] * 1e9)

    naive, e32, e16 = rates["naive"], rates["fp32_early"], rates["bf16_early"]
    print("| measure | value |\n|---|---|")
    print(f"| matmul peak fp32 | {peaks['float32']:,.0f} GFLOP/s |")
    print(f"| matmul peak bf16 | {peaks['bfloat16']:,.0f} GFLOP/s |" if native else
          "| matmul peak bf16 | not measured: no bf16 units (torch emulates bf16; capture runs in float32) |")
    print(f"| naive (full model, output_hidden_states, fp32) | {naive:,.0f} tok/s, {mfu(naive, n_full, 'float32'):.0%} of the fp32 limit |")
    print(f"| fp32, early exit after layer {max(layers)} | {e32:,.0f} tok/s, {mfu(e32, n_early, 'float32'):.0%} of the fp32 limit |")
    print(f"| {lo}, early exit (default) | {e16:,.0f} tok/s, {mfu(e16, n_early, low):.0%} of the {lo} limit, "
          f"{e16 / naive:.1f}x naive |")
    print(f"| {lo} matmul limit on the forward's own shapes (one block's linear layers, {bs} x {seqs.shape[1]} tokens) | "
          f"{shape_peak:,.0f} GFLOP/s; the early-exit forward runs at "
          f"{2 * n_early * e16 / (shape_peak * 1e9):.0%} of it |")
    for n, r in zip((small, large), runs):
        print(f"| capture() end to end, {n} + {n} sequences ({r['tokens']:,} tokens) | {r['loop_tok_s']:,.0f} tok/s in "
              f"the loop (stores included), {r['total_s']:.1f} s in all; peak RSS {r['peak_rss'] / GiB:.2f} GiB "
              f"(during the loop {r['loop_rss'] / GiB:.2f} GiB: {r['rss_halves'][0] / GiB:.2f} in its first half, "
              f"{r['rss_halves'][1] / GiB:.2f} in its second; anonymous {r['anon_halves'][0] / GiB:.2f} and "
              f"{r['anon_halves'][1] / GiB:.2f}) |")
    print(f"| cold load: GGUF -> safetensors cache | {cold:.1f} s |")
    print(f"| warm load from the cache | {t_model + t_tok:.1f} s (model {t_model:.1f} s + tokenizer {t_tok:.1f} s) |")
    print(f"| parameters run | early exit {n_early / 1e6:.1f} M, full model {n_full / 1e6:.1f} M (embedding lookup not counted) |")
    print(f"| load average (1 min, 2 cores) | {load_before[0]:.2f} at start, {load_mid[0]:.2f} after the "
          f"throughput figures, {load_after[0]:.2f} at end |")
    rss_growth = max(runs[1]["anon_halves"]) / max(runs[0]["anon_halves"])  # anonymous: the mapped file is bounded
    first, second = runs[1]["anon_halves"]  # the default-size capture's own memory, its second half against its first
    checks = {
        f"{lo} capture >= 2,500 tok/s": e16 >= 2500,
        f"{lo} capture >= 8x naive": e16 >= 8 * naive,
        f"{lo} capture >= 50% of the {lo} limit on the forward's own shapes": 2 * n_early * e16 >= 0.5 * shape_peak * 1e9,
        "warm load <= 5 s": t_model + t_tok <= 5,
        "peak RSS <= 2.5 GiB": max(r["peak_rss"] for r in runs) <= 2.5 * GiB,
        f"anonymous RSS during the loop flat with {large // small}x the tokens (grew {rss_growth:.2f}x)": rss_growth < 1.1,
        f"anonymous RSS flat over the second half of the {large} + {large} capture (grew {second / first:.3f}x over it)":
            second < 1.05 * first,
    }
    print()
    for what, ok in checks.items():
        print(f"- {'PASS' if ok else 'FAIL'}: {what}")


if __name__ == "__main__":
    main()
