"""Integrity (issue 13): a skipped stage proves its products are there and intact.

After a finished smoke reproduction, each kind of product is deleted, truncated or edited in a copy
of it (runs/ and figures/ copied to a temporary folder, POSAE_RUNS and POSAE_FIGURES pointed there);
the next `reproduce` must say which product and why in one line, rerun exactly the stages that
depend on it (a stage whose repaired products equal the recorded ones does not make what reads
them rerun) and leave the products equal to the uninterrupted run's: every CSV and Markdown table
byte for byte, and the repaired store or SAE weights too. The 8 kinds: a store array, a store's
meta.json, a run's weights, a run's config.json (seed edited), a run folder deleted, a probe CSV, a
figure file, a stage record. Then: --only with an upstream product missing stops before the stage,
and reading a corrupt run names the file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from posae import checkpoint
from posae.__main__ import main
from posae.checkpoint import find_runs
from posae.checks import load_config
from posae.paths import figures_dir, run_dir
from posae.pipeline.driver import reproduce
from posae.pipeline.stages import UpstreamNotReady


@pytest.fixture(scope="module")
def reference(smoke_reproduction) -> tuple[Path, Path]:
    """runs/smoke and figures/smoke of the session's reproduction, settled (every stage up to date)."""
    rows = reproduce("smoke", log=lambda line: None)
    assert {r["status"] for r in rows} == {"skipped"}
    return run_dir("smoke"), figures_dir("smoke")


@pytest.fixture
def copy(reference, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A copy of the reference products, which the driver and the notebooks it starts now use."""
    runs, figs = tmp_path / "runs", tmp_path / "figures"
    shutil.copytree(reference[0], runs / "smoke")
    shutil.copytree(reference[1], figs / "smoke")
    monkeypatch.setenv("POSAE_RUNS", str(runs))
    monkeypatch.setenv("POSAE_FIGURES", str(figs))
    return runs / "smoke", figs / "smoke"


def rerun(**kwargs) -> tuple[list[str], str]:
    """reproduce("smoke"): (the stages that ran, its log)."""
    lines: list[str] = []
    rows = reproduce("smoke", log=lines.append, **kwargs)
    return [r["stage"] for r in rows if r["status"] == "ran"], "\n".join(lines)


def tables(run: Path, figs: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for folder in (run, figs) for p in sorted(folder.iterdir())
            if p.suffix in (".csv", ".md")}


def assert_repaired(copy: tuple[Path, Path], reference: tuple[Path, Path], *products: str) -> None:
    """The tables, and each product named (a file or folder under runs/smoke/), equal the reference's."""
    new, ref = tables(*copy), tables(*reference)
    assert new.keys() == ref.keys() and len(new) >= 10
    assert [name for name in ref if new[name] != ref[name]] == []
    for rel in products:
        a, b = reference[0] / rel, copy[0] / rel
        files = [p.relative_to(a) for p in sorted(a.rglob("*")) if p.is_file()] if a.is_dir() else [Path()]
        assert files == ([p.relative_to(b) for p in sorted(b.rglob("*")) if p.is_file()] if b.is_dir() else [Path()])
        for f in files:
            assert (b / f).read_bytes() == (a / f).read_bytes(), f"{b / f} differs from the uninterrupted run's"


def flip_bits(path: Path, offset: int, n: int = 8) -> None:
    """Change `n` bytes in place: same size, other content (what bit rot or a stray write leaves)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytes(b ^ 1 for b in f.read(n))
        f.seek(offset)
        f.write(data)


def edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} in {path}"
    path.write_text(text.replace(old, new))


# --------------------------------------------------------------------------- stores: capture reruns, nothing else


def _edit_store_array(run: Path) -> None:
    acts = run / "activations" / "layer_1" / "val" / "acts.npy"
    flip_bits(acts, offset=acts.stat().st_size // 2)


def _edit_store_meta(run: Path) -> None:
    meta = run / "activations" / "layer_2" / "train" / "meta.json"
    scale = meta.read_text().split('"scale": ', 1)[1].split(",", 1)[0]
    edit_text(meta, f'"scale": {scale},', f'"scale": {scale[:-1]}{(int(scale[-1]) + 1) % 10},')


@pytest.mark.parametrize("edit, says", [
    (_edit_store_array, "activations/layer_1/val/acts.npy: content changed"),
    (_edit_store_meta, "activations/layer_2/train/meta.json: content changed"),
], ids=["store-array", "store-meta"])
def test_a_changed_store_is_recaptured_and_nothing_downstream_reruns(copy, reference, edit, says):
    edit(copy[0])
    ran, log = rerun()
    assert f"capture: rerunning: {says}" in log
    # Recaptured byte for byte: the stages that read the stores find them as they were, and are skipped.
    assert ran == ["capture"], log
    assert_repaired(copy, reference, "activations")


def test_capture_itself_recaptures_a_store_whose_data_changed(copy, reference, capfd):
    """Without the driver: notebook 01 checks every file's digest before reusing a store."""
    from posae.data.capture import capture

    _edit_store_array(copy[0])
    capfd.readouterr()
    capture(load_config("smoke"), progress=False)
    acts = copy[0] / "activations" / "layer_1" / "val" / "acts.npy"
    assert capfd.readouterr().err == (f"posae: recapturing a store: {acts}: content changed (its digest differs "
                                      "from the one recorded in meta.json when it was written)\n")
    assert_repaired(copy, reference, "activations")


# --------------------------------------------------------------------------- run folders: trained again, readers rerun


@pytest.mark.slow
def test_changed_or_missing_runs_are_trained_again(copy, reference):
    run = copy[0]
    saes = run / "saes"
    weights = saes / "baseline" / "layer_2" / "seed_0" / checkpoint.WEIGHTS
    os.truncate(weights, weights.stat().st_size // 2)
    edit_text(saes / "contrastive" / "layer_1" / "seed_0" / checkpoint.INFO, '\n  "seed": 0,\n', '\n  "seed": 1,\n')
    shutil.rmtree(saes / "residual" / "layer_1" / "seed_1")
    ran, log = rerun()
    for says in ("train:baseline: rerunning: saes/baseline/layer_2/seed_0/weights.safetensors: size ",
                 "train:contrastive: rerunning: saes/contrastive/layer_1/seed_0/config.json: content changed",
                 "train:residual: rerunning: saes/residual/layer_1/seed_1 is missing"):
        assert says in log, log
    # A retrained run's config.json holds its own timings, so what reads the runs reruns too.
    assert ran == ["train:baseline", "train:contrastive", "train:residual", "probe", "ablations", "inspect", "figures"], log
    assert "probe: rerunning: the products of train:baseline changed since it ran" in log
    assert_repaired(copy, reference, *(f"saes/{v}/layer_{layer}/seed_{s}/{checkpoint.WEIGHTS}" for v, layer, s in
                                       (("baseline", 2, 0), ("contrastive", 1, 0), ("residual", 1, 1))))
    assert checkpoint.read_info(saes / "contrastive" / "layer_1" / "seed_0")["seed"] == 0
    assert rerun()[0] == []  # and now it is all up to date


# --------------------------------------------------------------------------- tables, figures, records: their stage only


def _edit_probe_table(run: Path, figs: Path) -> None:
    path = run / "probes.csv"
    text = path.read_text()
    at = text.index("0.", text.index("\n") + 1) + 2  # a digit of the first row's first fraction
    path.write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:])


def _truncate_figure(run: Path, figs: Path) -> None:
    os.truncate(figs / "mse_ratio.png", 0)


def _corrupt_record(run: Path, figs: Path) -> None:
    (run / "stages" / "ablations.json").write_text('{"stage": "ablations", "fingerp')


@pytest.mark.parametrize("edit, stage, says", [
    (_edit_probe_table, "probe", "probes.csv: content changed"),
    (_truncate_figure, "figures", "mse_ratio.png: size 0 != recorded "),
    (_corrupt_record, "ablations", "its record stages/ablations.json is not valid JSON"),
], ids=["probe-csv", "figure", "stage-record"])
def test_a_changed_table_figure_or_record_reruns_its_stage_only(copy, reference, edit, stage, says):
    edit(*copy)
    ran, log = rerun()
    assert f"{stage}: rerunning: " in log and says in log.split(f"{stage}: rerunning: ", 1)[1].splitlines()[0], log
    # Rewritten as they were: the figures stage (which reads probes.csv and the ablations) is not rerun for them.
    assert ran == [stage], log
    assert_repaired(copy, reference)
    assert (copy[1] / "mse_ratio.png").stat().st_size > 10_000


# --------------------------------------------------------------------------- --only: no silent work on missing inputs


def test_only_stops_before_a_stage_whose_upstream_product_is_missing(copy, reference, monkeypatch, capsys):
    shutil.rmtree(copy[0] / "saes" / "residual" / "layer_1" / "seed_1")
    before = tables(*copy)
    monkeypatch.setattr("posae.pipeline.driver.execute", lambda *a: pytest.fail("a stage ran"))
    with pytest.raises(UpstreamNotReady) as err:
        rerun(only=("probe", "figures"), force=("probe",))
    assert str(err.value) == (
        "stage probe not run: it reads the products of train:residual, which --only leaves out, and one is not as "
        "recorded: saes/residual/layer_1/seed_1 is missing. Fix: drop --only (the driver then reruns "
        "train:residual first), or add train:residual to --only")
    assert main(["reproduce", "--config", "smoke", "--only", "probe", "--force", "probe"]) == 2  # refused before work
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: stage probe not run: "), err_lines
    assert tables(*copy) == before


# --------------------------------------------------------------------------- reading a corrupt run


def _seed_edited(folder: Path) -> None:
    edit_text(folder / checkpoint.INFO, '\n  "seed": 0,\n', '\n  "seed": 1,\n')


def _info_not_json(folder: Path) -> None:
    (folder / checkpoint.INFO).write_text('{"variant": "baseline", ')


def _metrics_not_json(folder: Path) -> None:
    with open(folder / checkpoint.METRICS, "a") as f:
        f.write('{"step": 21, "losses/total": \n')


@pytest.mark.parametrize("edit, read, says", [
    (_seed_edited, lambda: find_runs(load_config("smoke")),
     ("config.json: says seed 1, but the folder is the run of seed 0 (a run's identity is its path, "
      "saes/<variant>/layer_<L>/seed_<s>). Fix: train the run again")),
    (_info_not_json, lambda: find_runs(load_config("smoke")), "config.json: not valid JSON (Expecting "),
    (_metrics_not_json, lambda: checkpoint.metrics_frame("smoke"), "metrics.jsonl: line 6 is not valid JSON ("),
], ids=["seed-edited", "config-not-json", "metrics-not-json"])
def test_reading_a_corrupt_run_names_the_file_and_the_fix(copy, edit, read, says):
    folder = copy[0] / "saes" / "baseline" / "layer_1" / "seed_0"
    edit(folder)
    with pytest.raises(checkpoint.CorruptRun) as err:
        read()
    assert str(err.value).startswith(str(folder / says.split(":", 1)[0])) and says in str(err.value)
    assert "Fix: " in str(err.value)
