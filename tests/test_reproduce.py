"""The driver: the smoke pipeline end to end through papermill, skipping, fingerprints, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posae.checks import load_config
from posae.paths import NOTEBOOKS_DIR, REPO_ROOT, figures_dir, run_dir
from posae.pipeline.driver import execute, reproduce
from posae.pipeline.stages import Stage, StageFailed, UnknownStage, fingerprint, stage_list


def test_every_stage_runs_and_renders(smoke_reproduction):
    names = [r["stage"] for r in smoke_reproduction]
    assert names[:3] == ["ground_truth", "capture", "structure"] and names[-1] == "figures"
    assert sum(n.startswith("train:") for n in names) == len(stage_list(load_config("smoke"))) - 7
    out = run_dir("smoke") / "notebooks"
    for stage in stage_list(load_config("smoke")):
        assert (out / f"{stage.output_stem}.ipynb").exists()
        assert (out / f"{stage.output_stem}.html").stat().st_size > 10_000
        assert (figures_dir("smoke") / "notebooks" / f"{stage.output_stem}.html").exists()


def test_a_second_run_skips_every_stage(smoke_reproduction):
    rows = reproduce("smoke", log=lambda line: None)
    assert {r["status"] for r in rows} == {"skipped"}


def test_a_lost_stage_record_reruns_that_stage_only(smoke_reproduction):
    # What a driver killed during the figures stage leaves: every record but the last.
    (run_dir("smoke") / "stages" / "figures.json").unlink()
    rows = reproduce("smoke", log=lambda line: None)
    assert [r["stage"] for r in rows if r["status"] == "ran"] == ["figures"]


def test_changing_one_variant_invalidates_only_what_reads_it(tmp_path):
    cfg = load_config("smoke")
    stages = stage_list(cfg)
    variant_file = tmp_path / "baseline.yaml"
    variant_file.write_text("train: {l1_scale: 1.0}\n")
    stages = [Stage(s.name, s.notebook, s.parameters, s.depends, (variant_file,) if s.name == "train:baseline" else s.inputs)
              for s in stages]

    def fingerprints():
        fps = {}
        for s in stages:
            fps[s.name] = fingerprint(s, cfg, fps)
        return fps

    before = fingerprints()
    variant_file.write_text("train: {l1_scale: 2.0}\n")
    after = fingerprints()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"train:baseline", "probe", "ablations", "inspect", "figures"}  # inspect shows baseline


def test_unknown_stage_is_refused_before_any_work():
    with pytest.raises(UnknownStage, match="unknown stage 'trian'.*Fix"):
        reproduce("smoke", only=("trian",), log=lambda line: None)


def test_a_failing_notebook_stops_with_its_error_and_the_saved_notebook(smoke_capture):
    cfg = load_config("smoke")
    bad = Stage("train:nonexistent", "03_train.ipynb", {"config": "smoke", "variant": "nonexistent"})
    with pytest.raises(StageFailed, match=r"nonexistent(.|\n)*failed notebook is saved at .*03_train-nonexistent.ipynb"):
        execute(cfg, bad)


def test_papermill_without_output_path_from_another_directory(smoke_reproduction, tmp_path):
    """docs/decisions.md §2's own form, `papermill notebooks/03_train.ipynb -p variant contrastive` with no output
    path (valid when stdout is not a terminal), run from outside the repository."""
    result = subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOKS_DIR / "03_train.ipynb"),
         "-p", "variant", "contrastive", "-p", "config", "smoke"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    executed = json.loads(result.stdout)
    assert executed["cells"][-1]["outputs"], "the metrics table produced no output"
    assert list(tmp_path.iterdir()) == [], "products belong under runs/, not the working directory"
