"""The eager floor of a training step: every op the step runs, each timed alone, summed.

A step in eager PyTorch is a sequence of aten ops, each reading its inputs and writing its outputs.
This script records that sequence for one step of each variant (a dispatch mode sees every op,
forward, backward and optimizer), then replays each op on its recorded inputs, alone and warm, and
keeps its best time. The sum is what the step would take if every op ran at its isolated speed:
nothing lost between ops to caches, the allocator, autograd or Python. Where a variant's floor is
already more than a target multiple of the baseline's floor, no rearrangement of the same ops can meet
that target; only fewer or fused ops can.

    .venv/bin/python benchmarks/step_floor.py                                    # 4,096 tokens, k = 640
    .venv/bin/python benchmarks/step_floor.py --variants baseline hierarchical --batch 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

sys.path.insert(0, str(Path(__file__).parent))
import train_step as ts  # noqa: E402  (the benchmark's in-memory store and step builders)

from posae import memory, provenance  # noqa: E402
from posae.config import TrainConfig  # noqa: E402

MATMULS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.", "mkldnn._linear_pointwise.")


class _Record(TorchDispatchMode):
    """Runs every op and keeps (op, cloned inputs) to replay it later."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[object, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        clone = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
        self.ops.append((func, tree_map(clone, args), tree_map(clone, kwargs)))
        return func(*args, **kwargs)


def op_seconds(func, args, kwargs, reps: int) -> float:
    """Best time of `func` on fresh copies of its inputs (an in-place op must not see its own output)."""
    mutable = getattr(func, "_schema", None) is not None and func._schema.is_mutable
    best = float("inf")
    for _ in range(reps):
        a, k = (tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, x) for x in (args, kwargs)) \
            if mutable else (args, kwargs)
        t0 = time.perf_counter()
        func(*a, **k)
        best = min(best, time.perf_counter() - t0)
    return best


def floor(variant: str, k: int, dtype: torch.dtype | None, reps: int) -> tuple[float, float, float, int]:
    """(step seconds, floor seconds, floor seconds of the matmuls, ops) for one variant."""
    store, _ = ts.activations(max(65536, 4 * ts.B))
    run = ts.posae_step(store, variant, k, dtype)
    step = ts.best_seconds({variant: run}, rounds=5, reps=3)[variant]  # warms up first: AdamW state, oneDNN kernels
    rec = _Record()
    with rec:
        run(1)
    secs = [op_seconds(f, a, kw, reps) for f, a, kw in rec.ops]
    mm = sum(s for (f, _, _), s in zip(rec.ops, secs) if str(f).startswith(MATMULS))
    return step, sum(secs), mm, len(rec.ops)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+",
                    default=["baseline", "hierarchical", "hierarchical_unweighted", "attention_routing",
                             "multiscale", "contrastive"])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=640)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7, help="replays per op; the fastest counts")
    ap.add_argument("--target", type=float, default=1.5, help="the variant-over-baseline multiple to judge")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    memory.keep_freed_memory()  # as a training run does
    ts.B = args.batch
    dtype = ts.train.autocast_dtype(TrainConfig())
    print(f"CPU {provenance.cpu_model()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"bf16 units: {' '.join(provenance.cpu_bf16_features()) or 'none (float32 steps)'}; "
          f"batch {args.batch:,} tokens, k = {args.k}\n")
    print("| variant | ops | step ms | floor ms | of it matmuls | step / floor | floor / baseline's floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = None
    for variant in args.variants:
        step, total, mm, n = floor(variant, args.k, dtype, args.reps)
        base = total if variant == "baseline" or base is None else base
        print(f"| {variant} | {n} | {1e3 * step:.1f} | {1e3 * total:.1f} | {1e3 * mm:.1f} | {step / total:.2f} | "
              f"{total / base:.2f}x |")
    print(f"\nA variant whose floor is above {args.target}x the baseline's cannot reach {args.target}x with these ops "
          "in eager PyTorch; one below it could, if the time lost between ops were recovered.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
