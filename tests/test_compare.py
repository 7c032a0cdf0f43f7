"""The CI comparison of a reproduction with the committed figures: it must see a moved cell and a changed
verdict (planted positives), and pass the committed folder against itself (planted negative)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pandas as pd
import pytest

from posae.paths import FIGURES_DIR
import json

from posae.pipeline.compare import CROSS_PRECISION, TOLERANCE, compare, precision, tolerance

COMMITTED = FIGURES_DIR / "default"


@pytest.fixture
def copy(tmp_path):
    out = tmp_path / "new"
    out.mkdir()
    for name in ("table1.csv", "claims.csv"):
        shutil.copy(COMMITTED / name, out / name)
    return out


def test_the_committed_figures_agree_with_themselves(copy):
    assert compare(COMMITTED, copy) == []


def test_a_cell_moved_beyond_its_tolerance_is_named_with_both_values(copy):
    table = pd.read_csv(copy / "table1.csv")
    before = table.loc[table.variant == "hierarchical", "mse_mean"].item()
    table.loc[table.variant == "hierarchical", "mse_mean"] = before * 1.2
    table.to_csv(copy / "table1.csv", index=False)
    problems = compare(COMMITTED, copy)
    assert len(problems) == 1
    assert problems[0].startswith(f"table1.csv: hierarchical/learned, mse_mean: {before:.4g} -> {before * 1.2:.4g} "
                                  "(moved +")


def test_a_move_within_the_tolerance_passes(copy):
    table = pd.read_csv(copy / "table1.csv")
    table["U_mean"] += 0.5 * TOLERANCE["U"].atol
    table.to_csv(copy / "table1.csv", index=False)
    assert compare(COMMITTED, copy) == []


def test_a_changed_verdict_or_a_paper_number_fails(copy):
    claims = pd.read_csv(copy / "claims.csv")
    was = claims.loc[0, "verdict"]
    claims.loc[0, "verdict"] = "holds" if was != "holds" else "differs"
    claims.to_csv(copy / "claims.csv", index=False)
    table = pd.read_csv(copy / "table1.csv")
    table.loc[0, "paper_mse_mean"] += 0.01
    table.to_csv(copy / "table1.csv", index=False)
    problems = compare(COMMITTED, copy)
    assert any("verdict" in p and repr(was) in p for p in problems), problems
    assert any("paper_mse_mean" in p and "must be equal" in p for p in problems), problems


def test_the_command_exits_1_and_prints_the_cell(copy):
    table = pd.read_csv(copy / "table1.csv")
    table.loc[table.variant == "baseline", "runs"] = 5
    table.to_csv(copy / "table1.csv", index=False)
    p = subprocess.run([sys.executable, "-m", "posae.pipeline.compare", str(COMMITTED), str(copy)], capture_output=True, text=True)
    assert p.returncode == 1
    assert "table1.csv: baseline/arbitrary, runs: 6 -> 5 (must be equal)" in p.stdout
    ok = subprocess.run([sys.executable, "-m", "posae.pipeline.compare", str(COMMITTED), str(COMMITTED)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_every_measured_column_of_table1_has_a_tolerance():
    table = pd.read_csv(COMMITTED / "table1.csv")
    ours = [c for c in table if c.endswith(("_mean", "_std")) and not c.startswith("paper_")]
    assert [c for c in ours if tolerance(c) is None] == []


def _write_run_info(folder, cpu_bf16):
    (folder / "run_info.json").write_text(json.dumps({"machine": {"cpu_model": "x", "cpu_bf16": cpu_bf16}}))


@pytest.mark.parametrize("moved", [2.0, CROSS_PRECISION + 1.0])
def test_a_float32_run_against_a_bf16_one_gets_the_wider_allowance_and_no_more(tmp_path, copy, moved):
    """Planted: a cell moved `moved` times its allowance. Between two bf16 runs it fails; between a bf16 and a
    float32 run (a CPU without bf16 units) it passes at 2x and fails beyond CROSS_PRECISION."""
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("table1.csv", "claims.csv"):
        shutil.copy(COMMITTED / name, ref / name)
    _write_run_info(ref, ["amx_bf16", "amx_tile", "avx512_bf16"])
    table = pd.read_csv(copy / "table1.csv")
    table["U_mean"] += moved * TOLERANCE["U"].atol
    table.to_csv(copy / "table1.csv", index=False)
    _write_run_info(copy, ["avx512_bf16"])
    assert precision(copy) == "bfloat16" and len(compare(ref, copy)) == len(table)
    _write_run_info(copy, [])
    assert precision(copy) == "float32"
    assert (compare(ref, copy) == []) == (moved < CROSS_PRECISION)


def test_precision_is_read_from_run_info_and_absent_without_it(copy):
    assert precision(COMMITTED) in ("bfloat16", "float32")
    assert precision(copy) is None  # no run_info.json: same-precision tolerances


@pytest.mark.parametrize("moved, passes", [(0.034, True), (0.4, False)])
def test_a_std_is_allowed_a_share_of_the_metrics_mean_not_of_itself(copy, moved, passes):
    # The measured case: a rounding-only change moved soft_masking_sparse's KL std 0.088 -> 0.122 (mean 2.43).
    # A move of a tenth of the mean and more is still a changed result.
    table = pd.read_csv(copy / "table1.csv")
    row = table.variant == "soft_masking_sparse"
    table.loc[row, "kl_std"] += moved
    table.to_csv(copy / "table1.csv", index=False)
    problems = compare(COMMITTED, copy)
    assert (problems == []) == passes, problems
    if not passes:
        assert len(problems) == 1 and "soft_masking_sparse/learned, kl_std" in problems[0]


def test_without_a_mean_a_std_keeps_its_own_relative_allowance():
    assert str(tolerance("kl_std")) == str(tolerance("kl_std", mean=float("nan"))) == "0.01 + 10% of it"
    assert str(tolerance("kl_std", mean=2.0)) == "0.21"
