"""Why a training step's weight gradients run at about half the bf16 peak, and why a transpose does not help.

Every product of a step is one of two shapes at k = d: a "tall" one, [B, d] x [d, k] (the encoder, the
decoder and the decoder's backward), and a weight gradient, [d, B] x [B, k], whose contraction runs over the
batch. Both operands of a weight gradient are [B, ·] tensors stored row by row, so one of them reaches the
product as a transposed (column-major) view. This script times each shape in all four layouts of its
operands, then what it would cost to make the transposed operand row-major first (a copy of it, the ways
torch offers), so the two can be set side by side in one run: if copy + row-major product is not faster
than the column-major product, the layout is a bound of eager PyTorch on this CPU, not a choice of ours.

    .venv/bin/python benchmarks/matmul_layouts.py                 # one thread, B = 4096, d = k = 640
    .venv/bin/python benchmarks/matmul_layouts.py --batch 1024 --k 2560
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_step as ts  # noqa: E402  (its interleaved best-round timer)

from posae import provenance  # noqa: E402


def operand(rows: int, cols: int, column_major: bool) -> torch.Tensor:
    """A [rows, cols] bf16 matrix stored row-major, or a transposed view of a [cols, rows] one."""
    if column_major:
        return torch.randn(cols, rows).bfloat16().T
    return torch.randn(rows, cols).bfloat16()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d", type=int, default=640)
    ap.add_argument("--k", type=int, default=640)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, D, K = args.batch, args.d, args.k
    print(f"# bf16 products of a training step by operand layout, B = {B}, d = {D}, k = {K}")
    print(f"torch {torch.__version__}, {args.threads} threads, {provenance.cpu_model()} "
          f"({' '.join(provenance.cpu_bf16_features()) or 'no bf16 units'})\n")
    print("| product [M, K] x [K, N] | A | B | ms | GFLOP/s |")
    print("|---|---|---|---:|---:|")
    shapes = {"tall, x W": (B, D, K), "weight gradient, x^T g": (D, B, K)}
    cases = {(name, a_col, b_col): (operand(m, c, a_col), operand(c, n, b_col))
             for name, (m, c, n) in shapes.items() for a_col, b_col in itertools.product((False, True), repeat=2)}
    secs = ts.best_seconds({case: ts.repeat(lambda a=a, b=b: torch.mm(a, b)) for case, (a, b) in cases.items()},
                           rounds=5, reps=10)
    times = {case: s * 1e3 for case, s in secs.items()}
    for (name, a_col, b_col), ms in times.items():
        m, c, n = shapes[name]
        print(f"| {name}: [{m}, {c}] x [{c}, {n}] | {'column' if a_col else 'row'}-major "
              f"| {'column' if b_col else 'row'}-major | {ms:.2f} | {2 * m * c * n / ms / 1e6:,.0f} |")
    x = torch.randn(B, D).bfloat16()
    out = torch.empty(D, B, dtype=torch.bfloat16)

    def by_row_blocks(rows: int = 128) -> torch.Tensor:
        for i in range(0, B, rows):
            out[:, i:i + rows].copy_(x[i:i + rows].T)
        return out

    copies = {"x.T.contiguous()": lambda: x.T.contiguous(), "copy_ in blocks of 128 rows": by_row_blocks}
    print(f"\nmaking the weight gradient's transposed operand x [{B}, {D}] row-major first:\n")
    print("| copy | ms | copy + row-major product, ms | column-major product, ms |")
    print("|---|---:|---:|---:|")
    as_is = times["weight gradient, x^T g", True, False]
    row_major = times["weight gradient, x^T g", False, False]
    copy_secs = ts.best_seconds({name: ts.repeat(fn) for name, fn in copies.items()}, rounds=5, reps=10)
    for name, seconds in copy_secs.items():
        ms = seconds * 1e3
        print(f"| {name} | {ms:.2f} | {ms + row_major:.2f} | {as_is:.2f} |")


if __name__ == "__main__":
    main()
