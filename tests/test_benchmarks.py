"""The benchmark scripts' own logic (their figures are measured by running them, not here)."""

import sys

import torch

from posae.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import step_floor  # noqa: E402


def test_step_floor_records_every_op_and_replays_in_place_ops_on_copies():
    x = torch.ones(4, 3)
    with step_floor._Record() as rec:
        y = (x * 2).add_(1).sum()
    names = [str(f) for f, _, _ in rec.ops]
    assert names == ["aten.mul.Tensor", "aten.add_.Tensor", "aten.sum.default"] and float(y) == 36.0
    func, args, kwargs = rec.ops[1]
    recorded = args[0].clone()
    assert step_floor.op_seconds(func, args, kwargs, reps=3) >= 0
    assert torch.equal(args[0], recorded)  # add_ ran on a copy: a replay sees the same inputs every time
    assert torch.equal(x, torch.ones(4, 3))  # and the recording cloned the step's tensors


def test_step_floor_counts_the_matmuls_by_name():
    a = torch.randn(8, 8)
    with step_floor._Record() as rec:
        torch.addmm(a, a, a).mm(a).relu()
    mm = [str(f) for f, _, _ in rec.ops if str(f).startswith(step_floor.MATMULS)]
    assert mm == ["aten.addmm.default", "aten.mm.default"]


def test_matmul_layouts_builds_the_layout_it_names():
    import matmul_layouts

    row, col = matmul_layouts.operand(6, 4, False), matmul_layouts.operand(6, 4, True)
    assert row.shape == col.shape == (6, 4) and row.dtype == col.dtype == torch.bfloat16
    assert row.stride() == (4, 1)  # row-major
    assert col.stride() == (1, 6)  # column-major: a transposed view, as a weight gradient's operand arrives
