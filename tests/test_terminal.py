"""What a person sees: the driver's terminal and the rendered notebooks say what happened and nothing else.

No kernel chatter in the terminal ("[IPKernelApp] WARNING | Kernel is running over TCP ...", "ERROR |
KeyboardInterrupt caught in kernel"), no widget warnings or progress-bar refreshes in a saved
notebook (one summary line per loop), no absolute paths of the machine that ran it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from posae.paths import REPO_ROOT, shown
from posae.progress import Summary


def _outputs(notebook: Path):
    for cell in json.loads(notebook.read_text())["cells"]:
        for out in cell.get("outputs", []):
            text = out.get("text") or "".join(
                "".join(v) if isinstance(v, list) else str(v) for v in out.get("data", {}).values())
            yield out, "".join(text) if isinstance(text, list) else text


def test_rendered_notebooks_hold_no_warnings_refreshes_or_machine_paths(smoke_reproduction, runs_root):
    from posae.checks import load_config
    from posae.pipeline.stages import stage_list

    folder = runs_root / "smoke" / "notebooks"
    notebooks = [folder / f"{stage.output_stem}.ipynb" for stage in stage_list(load_config("smoke"))]
    assert len(notebooks) == 18
    for nb in notebooks:
        for out, text in _outputs(nb):
            assert "TqdmWarning" not in text and "IProgress" not in text, nb.name
            assert str(REPO_ROOT) not in text and str(runs_root) not in text, (nb.name, text[:300])
            if out.get("name") == "stderr":
                assert "\r" not in text, (nb.name, text[:300])  # a refreshing bar, saved refresh by refresh
    train = "".join(t for o, t in _outputs(runs_root / "smoke" / "notebooks" / "03_train-baseline.ipynb")
                    if o.get("name") == "stderr")
    assert re.findall(r"^baseline layer \d seed \d: 5,120 tok in [\d.]+ s", train, re.M), train


def test_the_drivers_terminal_has_a_line_per_stage_and_no_kernel_chatter(smoke_reproduction, runs_root):
    env = {**os.environ, "POSAE_RUNS": str(runs_root)}
    p = subprocess.run([sys.executable, "-m", "posae", "reproduce", "--config", "smoke", "--only", "structure",
                        "--force", "structure"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert [re.sub(r"\d+m[\d.]+s", "T", l) for l in lines] == [
        "[1/1] structure: running 02_position_structure.ipynb (0 after it; elapsed T)",
        "[1/1] structure: done in T",
        "all 1 stages finished in T",
    ], lines


def test_summary_progress_counts_and_prints_one_line(capsys):
    bar = Summary(total=2048, desc="baseline layer 8 seed 0", unit="tok")
    bar.update(1024)
    bar.update(1024)
    bar.set_postfix(refresh=False, loss="5.7")
    bar.close()
    bar.close()
    err = capsys.readouterr().err
    assert re.fullmatch(r"baseline layer 8 seed 0: 2,048 tok in [\d.]+ s, [\d,.kMG]+ tok/s; loss=5.7\n", err), err
    assert list(Summary(range(3), desc="probe", unit="runs")) == [0, 1, 2]
    assert capsys.readouterr().err.startswith("probe: 3 runs in")


def test_shown_paths_are_relative_to_the_repository():
    assert shown(REPO_ROOT / "figures" / "default") == "figures/default"
    assert shown(REPO_ROOT) == "."
    assert shown(Path.home() / "elsewhere" / "x") in ("~/elsewhere/x", str(Path.home() / "elsewhere" / "x"))


def _started(config: str, native_bf16: bool, monkeypatch, names: tuple[str, ...] | None = None) -> list[str]:
    """The driver's lines as each selected stage of `config` starts, on a CPU with or without bf16 units."""
    from posae.checks import load_config
    from posae.data import models
    from posae.pipeline import driver
    from posae.pipeline.stages import stage_list

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native_bf16)
    cfg = load_config(config, check_model=False)
    stages = [s for s in stage_list(cfg) if names is None or s.name in names]
    lines: list[str] = []
    run = driver._Run(cfg, stages, {s.name: "" for s in stages}, (), len(stages), lines.append)
    for i, stage in enumerate(stages, 1):
        run.starting(i, stage)
    return lines


def test_a_cpu_without_bf16_units_is_said_once_before_the_first_stage_it_slows(monkeypatch):
    lines = _started("default", False, monkeypatch)
    notes = [i for i, line in enumerate(lines) if line.startswith("note: ")]
    assert notes == [0], lines  # before ground_truth, the first stage that trains
    assert "capture and training run in float32" in lines[0] and "Quick start" in lines[0]
    assert not [line for line in _started("default", True, monkeypatch) if line.startswith("note: ")]
    # Nothing it slows down runs: nothing to say. A config pinning the forward to float32 hears of training only.
    assert not [line for line in _started("default", False, monkeypatch, ("structure", "probe", "figures"))
                if line.startswith("note: ")]
    smoke = [line for line in _started("smoke", False, monkeypatch) if line.startswith("note: ")]
    assert len(smoke) == 1 and ", so training runs in float32" in smoke[0]
