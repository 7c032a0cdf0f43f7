"""Where a training step's time goes: torch profiler over `posae.train.train_step`, grouped.

One thread by default (as training runs), the default config's layer-8 activations in memory when
captured (else Gaussian data of that shape), d = 640. For each variant: the step's wall time, and its
ops' self CPU time in groups: the matmuls (mm, addmm, bmm), dtype casts, fused AdamW, gathers
(index_select and friends), the other element-wise and reduction ops, and what no op accounts for
(Python, autograd's bookkeeping, the allocator). The matmuls' GFLOP/s inside the step are set against
the bf16 peak measured on the same shapes in the same process.

    .venv/bin/python benchmarks/profile_step.py                          # baseline, 1,024 and 4,096 tokens
    .venv/bin/python benchmarks/profile_step.py --variants baseline contrastive --batch 4096 --top 12
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import train_step as ts  # noqa: E402  (the benchmark's in-memory store, peaks and step builders)

from posae import memory, provenance  # noqa: E402
from posae.config import TrainConfig  # noqa: E402

GROUPS = (
    # mkldnn::_linear_pointwise: a bf16 product with its bias, ReLU or sum in oneDNN's epilogue (posae.saes.base.linear)
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise")),
    ("casts", ("aten::_to_copy", "aten::to", "aten::copy_")),
    ("AdamW", ("aten::_fused_adamw_",)),
    ("gathers", ("aten::index_select", "aten::index", "aten::index_add", "aten::embedding", "aten::gather",
                 "aten::scatter", "aten::index_select_backward", "aten::index_add_")),
)
CONTAINERS = ("aten::matmul", "aten::linear", "aten::to")  # ops whose time is their children's: not counted twice


def group_of(name: str, groups=GROUPS, other: str = "other ops") -> str:
    return next((group for group, names in groups if name in names), other)


def grouped(events, per: int, groups=GROUPS, containers=CONTAINERS, other: str = "other ops"):
    """A profile's self CPU time (µs) per group and per op, and each op's calls, divided by `per` (the steps or
    batches the window held); containers (ops whose time is their children's) are not counted twice."""
    self_us: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = {}
    for e in events:
        if e.key in containers:
            continue
        self_us[group_of(e.key, groups, other)] += e.self_cpu_time_total / per
        per_op[e.key] += e.self_cpu_time_total / per
        calls[e.key] = e.count // per
    return self_us, per_op, calls


def print_groups(self_us: dict[str, float], wall: float, rest: str, unit: str = "ms", digits: int = 2,
                 groups=GROUPS, other: str = "other ops") -> None:
    """The Markdown table of `grouped`'s groups against the window's wall time (s), what no op accounts for last."""
    print(f"| where | {unit} | share |\n|---|---:|---:|")
    for group in [g for g, _ in groups] + [other]:
        print(f"| {group} | {self_us[group] / 1e3:.{digits}f} | {self_us[group] / 1e6 / wall:.0%} |")
    left = max(wall - sum(self_us.values()) / 1e6, 0)
    print(f"| no op ({rest}) | {left * 1e3:.{digits}f} | {left / wall:.0%} |")


def profile_variant(variant: str, batch: int, k: int, steps: int, top: int, peak: float, rounds: int,
                    dtype: torch.dtype | None) -> None:
    ts.B = batch
    store, _ = ts.activations(max(65536, 4 * batch))
    run = ts.posae_step(store, variant, k, dtype)
    run(3)  # warm-up
    # The fastest of `rounds` profiled windows: on a shared host a window can lose a third of its speed to a
    # neighbour's memory traffic, and that says nothing about the step.
    best = None
    for _ in range(rounds):
        with profile(activities=[ProfilerActivity.CPU]) as prof:  # shapes and FLOPs cost 2x at 4,096 tokens
            t0 = ts.CLOCK()
            run(steps)
            wall = (ts.CLOCK() - t0) / steps
        if best is None or wall < best[1]:
            best = prof, wall
    prof, wall = best
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as shaped:
        run(1)  # FLOPs and shapes only: this pass's times are not used
    self_us, per_op, calls = grouped(prof.key_averages(), steps)
    flops = sum(matmul_flops(e) for e in shaped.events() if group_of(e.key) == "matmuls" and e.key not in CONTAINERS)
    print(f"\n### {variant}, batch {batch:,}, k = {k}: {wall * 1e3:.1f} ms per step "
          f"({batch / wall / 1e3:.1f}k tokens/s)\n")
    print_groups(self_us, wall, "Python, autograd, allocator")
    mm = self_us["matmuls"] / 1e6
    print(f"\nmatmuls inside the step: {flops / 1e9:.2f} GFLOP at {flops / max(mm, 1e-12) / 1e9:.0f} GFLOP/s; "
          f"the whole step at {flops / wall / 1e9:.0f} GFLOP/s = {flops / wall / 1e9 / peak:.0%} of the {'bf16' if dtype else 'fp32'} peak "
          f"({peak:.0f} GFLOP/s on the step's shapes)")
    if top:
        print(f"\nlargest {top} ops by self CPU time (ms per step; calls per step, and the input shapes of its "
              f"most frequent call):\n")
        shapes = {}
        for e in sorted(shaped.key_averages(group_by_input_shape=True), key=lambda e: e.count):
            shapes[e.key] = str(e.input_shapes)[:70]
        for name, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
            print(f"- {name}: {us / 1e3:.2f} ({calls.get(name, 0)} calls; {shapes.get(name, '')})")


def matmul_flops(event) -> float:
    """A matmul event's FLOPs: the profiler's count, or for oneDNN's fused product (which it does not count)
    2 · rows · in · out from its input [rows, in] and its weight [out, in]: the second argument, or the third
    in the `.binary` overload (X, other, W, B, attr), which has five arguments where the default has six."""
    if event.name == "mkldnn::_linear_pointwise":
        shapes = event.input_shapes
        (rows, inner), (out, _) = shapes[0], shapes[2 if len(shapes) == 5 else 1]
        return 2.0 * rows * inner * out
    return float(event.flops or 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["baseline"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--k", type=int, default=640)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="profiled windows per variant; the fastest is reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from posae import train

    memory.keep_freed_memory()  # as a training run does (else glibc zero-fills fresh pages for every large tensor)
    # As training chooses: bf16 autocast where the CPU has bf16 units, float32 where torch would emulate bf16.
    dtype = train.autocast_dtype(TrainConfig())
    units = " ".join(provenance.cpu_bf16_features()) or "none (the step runs in float32)"
    print(f"CPU {provenance.cpu_model()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"bf16 units: {units}")
    for batch in args.batch:
        ts.B = batch
        peak_dtype = torch.bfloat16 if dtype else torch.float32
        peak = ts.matmul_peaks(args.k, (peak_dtype,))[str(peak_dtype).replace("torch.", "")]
        for variant in args.variants:
            profile_variant(variant, batch, args.k, args.steps, args.top, peak, args.rounds, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
