"""Overrides (``--set key=value``, the notebooks' ``overrides``): parsing, validation messages, the derived
config's name, and the reuse of the base config's activation stores by a config that changes only sae,
train or probe settings."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posae.__main__ import main
from posae.checks import load_config
from posae.config import NAME_MAX, ConfigError, derived_name, parse_overrides, read_config, shares_stores
from posae.paths import NOTEBOOKS_DIR, PARAMS_DIR, REPO_ROOT, run_dir, sae_dir

SMOKE = str(PARAMS_DIR / "smoke.yaml")
TRAIN_KEYS = ("seeds, steps, batch_size, grad_accum, lr, lr_warmup, lr_decay, betas, weight_decay, l1, l1_scale, "
              "l1_warmup, position_weighted, recon_loss, dtype, resample, resample_after, dead_window, "
              "checkpoint_every, log_every")
FIX = 'e.g. --set train.l1=0.05 (papermill: -p overrides "train.l1=0.05,train.steps=600")'


# --------------------------------------------------------------------------- parsing


def test_a_string_splits_at_commas_outside_brackets_and_a_list_is_one_item_each():
    parsed = parse_overrides("train.steps=600, train.seeds=[0, 1],corpus.name='a,b',train.l1=0.05,")
    assert [(o.key, o.value) for o in parsed] == [("corpus.name", "a,b"), ("train.l1", 0.05),
                                                  ("train.seeds", [0, 1]), ("train.steps", 600)]  # by key
    as_list = parse_overrides(["train.l1=0.05", "corpus.name=a,b"])  # --set: the whole text is the value
    assert [(o.key, o.value) for o in as_list] == [("corpus.name", "a,b"), ("train.l1", 0.05)]
    assert parse_overrides(None) == parse_overrides("") == parse_overrides([]) == ()


def test_values_are_yaml_and_an_exponent_is_a_number_only_where_the_key_is_one():
    cfg = read_config("smoke", ["train.lr=1e-3", "model.revision=null", "train.resample=false", "corpus.name=1e5"])
    assert cfg.train.lr == 0.001 and cfg.model.revision is None and cfg.train.resample is False
    assert cfg.corpus.name == "1e5"  # a string key keeps the text


@pytest.mark.parametrize("overrides, message", [
    ("train.l1x=0.05", f"override 'train.l1x=0.05': train.l1x: unknown key. Fix: remove it or use one of: "
                       f"{TRAIN_KEYS}"),
    ("l1=0.05", "override 'l1=0.05': l1: unknown key. Fix: remove it or use one of: name, model, corpus, capture, "
                "sae, train, probe"),
    ("train.l1", f"override 'train.l1': not of the form key=value. Fix: write section.key=value, {FIX}"),
    ("train..l1=3", f"override 'train..l1=3': 'train..l1' is not a dotted key. Fix: write section.key=value, {FIX}"),
    ("train.l1=abc", "override 'train.l1=abc': train.l1: expected a number, got 'abc'. Fix: write a number "
                     "such as 0.1"),
    ("train.steps=0", "override 'train.steps=0': train.steps: 0 is below the minimum 1. Fix: use a value >= 1"),
    ("train.seeds=[0, 0]", "override 'train.seeds=[0, 0]': train.seeds [0, 0] repeats a seed. Fix: list each "
                           "seed once"),
    ("train.seeds=[0,1", "override 'train.seeds=[0,1': the value is not valid YAML (line 1, column 5: while parsing "
                         "a flow sequence, expected ',' or ']', but got '<stream end>'). Fix: write a YAML value, "
                         "e.g. 0.05, true, null, sotu or [0, 1]"),
    ("train.l1=0.1,train.l1=0.2", "override 'train.l1=0.2': train.l1 is set twice (train.l1=0.1, train.l1=0.2). "
                                  "Fix: set each key once"),
    ("train={l1: 0.1},train.l1=0.2", "override 'train.l1=0.2': train.l1 is set twice (train={l1: 0.1}, "
                                     "train.l1=0.2). Fix: set each key once"),
    ("base=paper", "override 'base=paper': base is chosen by the config file, not overridden. Fix: name the config "
                   "to start from with --config (papermill: -p config)"),
    (3, f"overrides: expected key=value items, as a string separated by commas or as a list of strings, got 3 (int). "
        f"Fix: {FIX}"),
])
def test_a_bad_override_is_one_message_naming_it_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        read_config("smoke", overrides)
    assert str(err.value) == message


def test_a_world_check_names_the_override_that_set_the_key():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", overrides="capture.layers=[1, 9]")
    assert str(err.value) == (f"override 'capture.layers=[1, 9]': capture.layers has 9, but random has 4 layers "
                              f"(0..3) (applied to {SMOKE}). Fix: use layers below 4")


def test_the_command_line_refuses_a_bad_set_in_one_line_before_any_work(capsys, runs_root):
    before = sorted(runs_root.iterdir()) if runs_root.exists() else []
    assert main(["reproduce", "--config", "smoke", "--set", "train.l1=0.05", "--set", "train.l1x=1"]) == 2
    assert capsys.readouterr().err == (f"error: override 'train.l1x=1': train.l1x: unknown key. Fix: remove it or "
                                       f"use one of: {TRAIN_KEYS}\n")
    assert main(["capture", "--config", "smoke", "--set", "train.steps"]) == 2
    assert capsys.readouterr().err.startswith("error: override 'train.steps': not of the form key=value.")
    assert (sorted(runs_root.iterdir()) if runs_root.exists() else []) == before  # nothing written


# --------------------------------------------------------------------------- the derived name


def test_the_derived_name_is_readable_stable_and_one_plain_folder():
    cfg = read_config("smoke", ["train.steps=600", "train.l1=0.05", "train.seeds=[0, 1, 2]"])
    assert cfg.name == "smoke+train.l1=0.05+train.seeds=0,1,2+train.steps=600"
    assert cfg.overrides == ("train.l1=0.05", "train.seeds=[0, 1, 2]", "train.steps=600")
    for spelling in ("train.seeds=[0,1,2],train.l1=5e-2,train.steps=600", "train.steps=600,train.l1=0.050,"
                                                                           "train.seeds=[0, 1, 2]"):
        assert read_config("smoke", spelling).name == cfg.name  # order and spelling of a value do not matter
    assert read_config("smoke", "train.l1=0.06").name != read_config("smoke", "train.l1=0.6").name
    assert read_config("smoke", "name=sweep_a,train.l1=0.2").name == "sweep_a"  # name= names the run itself
    assert read_config("smoke").name == "smoke"


def test_a_value_without_a_short_exact_form_gets_a_hash_and_long_names_are_cut():
    a = read_config("smoke", ["sae.options={contrastive: {temperature: 0.2}}"]).name
    b = read_config("smoke", ["sae.options={contrastive: {temperature: 0.3}}"]).name
    assert a != b and a.startswith("smoke+sae.options=") and len(a.rsplit("+", 1)[1]) == 8
    slash = read_config("smoke", ["corpus.name=some/folder"]).name
    assert "/" not in slash and slash != read_config("smoke", ["corpus.name=some_folder"]).name
    long = read_config("smoke", [f"corpus.text_field={'x' * 300}"]).name
    assert len(long) <= NAME_MAX and long != read_config("smoke", [f"corpus.text_field={'x' * 301}"]).name
    for name in (a, b, slash, long):
        assert Path(name).name == name and name not in (".", "..")


def test_derived_name_of_a_config_with_bases_starts_with_its_own_name(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("base: smoke\ntrain: {l1: 0.2}\n")
    cfg = read_config(study, "train.steps=40")
    assert cfg.name == "study+train.steps=40" and cfg.bases == (SMOKE,)
    assert derived_name("study", parse_overrides("train.steps=40"), cfg) == cfg.name


# --------------------------------------------------------------------------- which stores a derived config reads


@pytest.mark.parametrize("override", ["train.l1=0.2", "train.steps=5", "sae.buckets=8", "sae.expansion=2.0",
                                      "probe.seed=3", "capture.layers=[2]"])
def test_a_config_changing_only_sae_train_or_probe_reads_its_bases_stores(override):
    from posae.data.store import store_settings

    smoke, cfg = read_config("smoke"), read_config("smoke", override)
    assert cfg.stores_name == "smoke" and shares_stores(cfg, smoke)
    assert all(store_settings(cfg, layer) == store_settings(smoke, layer) for layer in cfg.capture.layers)


@pytest.mark.parametrize("override", ["corpus.n_train=40", "corpus.seed=1", "capture.batch_size=8",
                                      "model.random.seed=1", "model.dtype=bfloat16", "capture.layers=[1, 3]"])
def test_a_config_changing_what_a_store_holds_gets_its_own(override):
    from posae.data.store import store_settings

    smoke, cfg = read_config("smoke"), read_config("smoke", override)
    assert cfg.stores_name == cfg.name != "smoke" and not shares_stores(cfg, smoke)
    assert any(store_settings(cfg, layer) != store_settings(smoke, layer) for layer in cfg.capture.layers
               if layer in smoke.capture.layers) or not set(cfg.capture.layers) <= set(smoke.capture.layers)


def test_a_base_file_shares_stores_and_siblings_share_the_root_most(tmp_path):
    (tmp_path / "a.yaml").write_text("base: smoke\ntrain: {l1: 0.2}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nprobe: {seed: 4}\n")
    (tmp_path / "c.yaml").write_text("base: a.yaml\ncorpus: {n_train: 40}\n")
    assert read_config(tmp_path / "b.yaml").stores_name == "smoke"
    assert read_config(tmp_path / "b.yaml", "train.l1=0.3").stores_name == "smoke"
    assert read_config(tmp_path / "c.yaml").stores_name == "c"
    assert read_config(tmp_path / "c.yaml", "train.l1=0.3").stores_name == "c"  # its nearest file's, not smoke's


def test_a_config_changed_in_code_after_loading_does_not_write_into_its_bases_stores():
    from posae.data.capture import store_paths

    cfg = read_config("smoke", "train.l1=0.2")
    assert all(p.is_relative_to(run_dir("smoke")) for p in store_paths(cfg).values())
    changed = dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, n_train=40))
    assert changed.stores_name == changed.name
    assert all(p.is_relative_to(run_dir(cfg.name)) for p in store_paths(changed).values())


# --------------------------------------------------------------------------- the sweep


def store_state(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_sweep_of_train_l1_trains_without_a_second_capture(smoke_capture, runs_root, one_thread):
    from posae.data.capture import capture
    from posae.train import train_variant

    stores = runs_root / "smoke" / "activations"
    before = store_state(stores)
    folders_before = sorted(p.parent.name for p in runs_root.glob("*/activations"))  # other tests' configs too
    assert before and all(p.is_relative_to(stores) for p in smoke_capture.values())
    runs = {}
    for l1 in (0.02, 0.08, 0.2):
        cfg = load_config("smoke", overrides=[f"train.l1={l1}"])
        assert capture(cfg, progress=False) == smoke_capture  # the base's stores, found complete
        [run] = train_variant(cfg, "baseline", [1], [0], progress=False)
        info = json.loads((run / "config.json").read_text())
        assert run == sae_dir(f"smoke+train.l1={l1}", "baseline", 1, 0)
        assert info["config"]["train"]["l1"] == l1 and Path(info["store"]["path"]).is_relative_to(stores)
        runs[l1] = (run / "weights.safetensors").read_bytes()
    assert len(set(runs.values())) == 3  # three trainings, each with its own λ1
    assert store_state(stores) == before  # no store rewritten: same inodes, times and sizes
    assert sorted(p.parent.name for p in runs_root.glob("*/activations")) == folders_before  # no activations folder added
    assert not any(runs_root.glob("smoke+*/activations"))
    # The planted negative: a corpus override is a new store identity, and it is captured apart.
    other = load_config("smoke", overrides=["corpus.n_train=40"])
    paths = capture(other, progress=False)
    assert all(p.is_relative_to(runs_root / "smoke+corpus.n_train=40" / "activations") for p in paths.values())
    assert sorted(p.parent.name for p in runs_root.glob("*/activations")) == sorted(
        {*folders_before, "smoke+corpus.n_train=40"})
    assert store_state(stores) == before


# --------------------------------------------------------------------------- notebooks and the driver


def test_every_notebook_has_an_overrides_parameter_and_passes_it_to_setup():
    from papermill.translators import PythonTranslator

    for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        names = {p.name: p.default for p in PythonTranslator.inspect({"source": "".join(cells[0]["source"])})}
        assert names.get("overrides") == '""', f"{path.name}: its parameters cell has no overrides = \"\""
        assert "setup(config, overrides)" in "".join(cells[1]["source"]), f"{path.name}: overrides not passed on"


def test_the_driver_gives_every_notebook_the_same_overrides():
    from posae.pipeline.driver import with_overrides
    from posae.pipeline.stages import fingerprint, stage_list

    plain = read_config("smoke")
    assert with_overrides(plain, stage_list(plain)) == stage_list(plain)  # no overrides: fingerprints unchanged
    cfg = read_config("smoke", "train.l1=0.2,train.seeds=[0, 1]")
    stages = with_overrides(cfg, stage_list(cfg))
    assert all(s.parameters["config"] == "smoke" and s.parameters["overrides"] == ["train.l1=0.2",
                                                                                   "train.seeds=[0, 1]"]
               for s in stages)
    # What a notebook loads from those parameters is the driver's config.
    again = load_config(stages[0].parameters["config"], check_model=False, overrides=stages[0].parameters["overrides"])
    assert again == cfg and again.name == cfg.name and again.stores_name == "smoke"
    assert fingerprint(stages[1], cfg, {}) != fingerprint(stage_list(plain)[1], plain, {})


def test_a_change_in_a_base_file_changes_the_fingerprints(tmp_path):
    from posae.pipeline.stages import fingerprint, stage_list

    base, child = tmp_path / "base.yaml", tmp_path / "child.yaml"
    base.write_text("base: smoke\ntrain: {l1: 0.2}\n")
    child.write_text("base: base.yaml\nprobe: {seed: 1}\n")
    first = fingerprint(stage_list(read_config(child))[0], read_config(child), {})
    base.write_text("base: smoke\ntrain: {l1: 0.3}\n")
    assert fingerprint(stage_list(read_config(child))[0], read_config(child), {}) != first


def papermill(notebook: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOKS_DIR / notebook), str(out), *args,
                           "--no-progress-bar"], cwd=REPO_ROOT, env={**os.environ, "POSAE_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def test_papermill_overrides_load_the_derived_config_and_a_bad_one_stops_with_the_same_message(
        smoke_capture, runs_root, tmp_path):
    before = store_state(runs_root / "smoke" / "activations")
    result = papermill("01_capture_activations.ipynb", tmp_path / "01.ipynb", "-p", "config", "smoke",
                       "-p", "overrides", "train.l1=0.2,train.seeds=[0, 1]")
    assert result.returncode == 0, result.stderr[-2000:]
    run = runs_root / "smoke+train.l1=0.2+train.seeds=0,1"
    record = (run / "environment" / "config.yaml").read_text()
    assert "# with the overrides train.l1=0.2, train.seeds=[0, 1]" in record and "  l1: 0.2\n" in record
    assert "runs/smoke/activations/" in record and not (run / "activations").exists()
    assert store_state(runs_root / "smoke" / "activations") == before  # reused, not captured again
    result = papermill("01_capture_activations.ipynb", tmp_path / "bad.ipynb", "-p", "config", "smoke",
                       "-p", "overrides", "train.l1x=1")
    assert result.returncode != 0
    assert (f"override 'train.l1x=1': train.l1x: unknown key. Fix: remove it or use one of: {TRAIN_KEYS}"
            in result.stdout + result.stderr)


@pytest.mark.slow
def test_a_derived_reproduction_records_the_base_stores_and_skips_when_rerun(smoke_capture, runs_root):
    from posae.pipeline.driver import reproduce

    before = store_state(runs_root / "smoke" / "activations")
    args = dict(only=("capture", "train:baseline"), variants=["baseline"], overrides=["train.l1=0.03"],
                log=lambda line: None, jobs=1)
    rows = reproduce("smoke", **args)
    assert [r["status"] for r in rows] == ["ran", "ran"]
    run = runs_root / "smoke+train.l1=0.03"
    record = json.loads((run / "stages" / "capture.json").read_text())
    assert record["products"] and all(k.startswith("../smoke/activations/") for k in record["products"])
    assert (run / "saes" / "baseline" / "layer_2" / "seed_1" / "config.json").exists()
    assert not (run / "activations").exists() and store_state(runs_root / "smoke" / "activations") == before
    assert [r["status"] for r in reproduce("smoke", **args)] == ["skipped", "skipped"]


def test_an_override_may_fix_what_the_file_alone_fails(tmp_path):
    path = tmp_path / "narrow.yaml"
    path.write_text("base: smoke\ncorpus: {seq_len: 4}\nsae: {buckets: 8}\n")
    with pytest.raises(ConfigError, match=r"sae.buckets 8 exceeds corpus.seq_len 4"):
        read_config(path)
    cfg = read_config(path, "sae.buckets=4")
    assert cfg.name == "narrow+sae.buckets=4"
    assert cfg.stores_name == cfg.name  # the file cannot run alone, so no stores of its own to share
