"""Where capture's forward time goes: torch profiler over the early-exit forward, grouped.

The default config's model (Gemma 3 270M, offline) and layers (3, 8, 13), batches of 16 x 128 tokens of
the default corpus, in the dtype capture resolves (`model.dtype: auto`: bf16 where the CPU has bf16 units,
float32 where torch would emulate it). For the fastest of a few profiled windows: the forward's wall
time per batch, and its ops' self CPU time in groups: the linear layers' matmuls, attention (the fused
SDPA kernel), dtype casts, the other element-wise and reduction ops (RMSNorm, rotary embeddings, the MLP's
gate, residual adds), and what no op accounts for (Python, hooks, module calls). The matmuls' GFLOP/s
inside the forward are set against the limit measured on the forward's own shapes in the same process
(`capture.py`'s `forward_shape_peak`), and the bound follows: the share of that limit the forward could
reach if its matmuls ran at the limit and everything else stayed as measured.

    .venv/bin/python benchmarks/profile_capture.py               # torch's default threads (2 here)
    .venv/bin/python benchmarks/profile_capture.py --threads 1 --top 12
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import capture as cb  # noqa: E402  (the capture benchmark's forward-shape limit)
import profile_step as ps  # noqa: E402  (grouping a profile's ops, its table)

from posae import memory, provenance  # noqa: E402
from posae.checks import load_config  # noqa: E402
from posae.data import capture as cap  # noqa: E402
from posae.data import corpus, models  # noqa: E402

GROUPS = (
    # mkldnn::_linear_pointwise is the MLP's gate projection with its GELU fused in (posae.data.kernels):
    # counted as a matmul, so the GELU's share of it counts as matmul time (~0.8 of its 2.9 ms on the Intel CPU).
    ("linear matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise")),
    ("attention (SDPA)", ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                          "aten::_softmax", "aten::softmax")),
    ("casts", ("aten::_to_copy", "aten::copy_")),
    ("embedding", ("aten::embedding", "aten::index_select")),
)
OTHER = "other element-wise and reductions"
# Ops whose time is their children's (not counted twice).
CONTAINERS = ("aten::linear", "aten::matmul", "aten::to", "aten::scaled_dot_product_attention", "aten::type_as")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    ap.add_argument("--batches", type=int, default=4, help="batches per profiled window")
    ap.add_argument("--rounds", type=int, default=3, help="profiled windows; the fastest is reported")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    memory.keep_freed_memory()  # as capture() does
    cfg = load_config("default")
    loaded = models.load_model(cfg.model)
    model, layers, B = loaded.model, tuple(cfg.capture.layers), cfg.capture.batch_size
    seqs = corpus.load_sequences(cfg.corpus, loaded.tokenizer, path=cfg.source).train_SL
    L = seqs.shape[1]
    batches = [torch.from_numpy(np.ascontiguousarray(seqs[i * B:(i + 1) * B])).long()
               for i in range(args.batches * args.rounds + 1)]
    units = " ".join(provenance.cpu_bf16_features()) or "none"
    print(f"CPU {provenance.cpu_model()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"bf16 units: {units}; forward in {str(loaded.dtype).removeprefix('torch.')}, "
          f"attention {model.config._attn_implementation}; {B} x {L} tokens a batch, early exit after layer "
          f"{max(layers)}")
    limit = cb.forward_shape_peak(model, B * L)
    flops_per_batch = 2 * cap.params_run(model, max(layers)) * B * L
    best = None
    with torch.inference_mode(), cap.layer_outputs(model, layers):
        cap.run_to(model, batches[0])  # warm-up: oneDNN picks each shape's kernel on the first call
        for r in range(args.rounds):
            window = batches[1 + r * args.batches: 1 + (r + 1) * args.batches]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for ids_BL in window:
                    cap.run_to(model, ids_BL)
                wall = (time.perf_counter() - t0) / len(window)
            if best is None or wall < best[1]:
                best = prof, wall
    prof, wall = best
    self_us, per_op, calls = ps.grouped(prof.key_averages(), args.batches, GROUPS, CONTAINERS, OTHER)
    print(f"\n{wall * 1e3:.0f} ms per batch ({B * L / wall:,.0f} tokens/s); {flops_per_batch / 1e9:.1f} GFLOP of "
          f"linear layers a batch; the limit on the forward's own shapes {limit:,.0f} GFLOP/s\n")
    ps.print_groups(self_us, wall, "Python, hooks, module calls", "ms per batch", 1, GROUPS, OTHER)
    mm = self_us["linear matmuls"] / 1e6
    at_limit = flops_per_batch / (limit * 1e9)
    print(f"\nthe forward: {flops_per_batch / wall / 1e9:,.0f} GFLOP/s = {flops_per_batch / wall / 1e9 / limit:.0%} of the "
          f"limit; its matmuls alone run at {flops_per_batch / max(mm, 1e-12) / 1e9:,.0f} GFLOP/s "
          f"({flops_per_batch / max(mm, 1e-12) / 1e9 / limit:.0%} of it)")
    print(f"bound: with the matmuls at the limit ({at_limit * 1e3:.1f} ms) and the rest as measured "
          f"({(wall - mm) * 1e3:.1f} ms), the forward would reach {at_limit / (at_limit + wall - mm):.0%} of the limit")
    if args.top:
        print(f"\nlargest {args.top} ops by self CPU time (ms per batch; calls per batch):\n")
        for name, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"- {name}: {us / 1e3:.2f} ({calls.get(name, 0)} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
