"""Bad inputs (issues 7 and 13): each case fails with one message naming the problem (file, key or
value) and the fix, and leaves every product made before it (activation stores, finished SAE runs,
figures) byte for byte as it was.

The cases, numbered as the README's Guarantees section counts them:

 1. unknown key in a config file              17. papermill run from another working directory
 2. unknown variant (argument and config)     18. config file that is not valid YAML
 3. wrong type                                19. unknown config name
 4. out-of-range value                        20. missing activation store
 5. layer beyond the model                    21. training batch larger than the store
 6. missing corpus files                      22. training a layer that was not captured
 7. empty corpus                              23. NaN or infinity for a number
 8. sequence length beyond the model's context 24. a key given twice (any level, run or variant file)
 9. corrupt (truncated) activation store      25. a value at a bound that cannot work (test_fraction 1)
10. stale store (settings changed since)      26. negative, too large or repeated seed
11. checkpoint from another variant           27. config name that is not a plain folder name
12. checkpoint of another shape               28. dictionary size k a variant cannot take
13. NaN or infinite loss during training      29. bad driver arguments (--variants, --only, --force,
14. full disk while writing a product             --jobs, --workers): refused before stage 1
15. unwritable output folder                  30. export-saelens --force onto runs or stores
16. notebook parameter of the wrong type      31. the CLI prints each known error as one line

Every case starts from `prior`: a config ("prior", the smoke model cut to one layer and one seed),
its training and validation stores, a finished baseline run, a finished hierarchical run and a
figures table, copied fresh for each test with their modification times.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from posae import checkpoint, saes, train
from posae.__main__ import main
from posae.checkpoint import CheckpointMismatch
from posae.checks import load_config
from posae.config import ConfigError
from posae.data.capture import capture
from posae.data.store import StoreError, open_layer_stores, store_settings, write_store
from posae.notebook import setup
from posae.paths import NOTEBOOKS_DIR, PARAMS_DIR, REPO_ROOT, Busy, OutputNotWritable, atomic_path, sae_dir
from posae.pipeline.driver import ExecutorError, reproduce
from posae.pipeline.export import ExportError, export_saelens, pipeline_products
from posae.pipeline.stages import UnknownStage, stage_list
from posae.saes import REGISTRY, as_variant_list, variant_config
from posae.train import TrainingDiverged, train_variant

pytestmark = pytest.mark.usefixtures("one_thread")

D, L, N_SEQ = 16, 16, 40  # synthetic stores: 40 sequences of positions 1..15, d = 16
LAYER = 1
PRIOR_CHANGES = {
    "name": "prior",
    "capture": {"layers": [LAYER], "batch_size": 16},
    "train": {"seeds": [0], "steps": 20, "batch_size": 64, "lr": 0.01, "checkpoint_every": 10, "log_every": 5},
}


def prior_yaml() -> dict:
    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    for section, values in PRIOR_CHANGES.items():
        data[section] = {**data[section], **values} if isinstance(values, dict) else values
    return data


def synthetic_store(path: Path, cfg, split: str, seed: int, stats_from=None):
    g = np.random.default_rng(seed)
    n_seq = N_SEQ if split == "train" else N_SEQ // 2
    pos = np.tile(np.arange(1, L), n_seq).astype(np.int32)
    seq = np.repeat(np.arange(n_seq), L - 1).astype(np.int32)
    x = g.standard_normal((len(pos), D)).astype(np.float32) + 0.3 * g.standard_normal((L, D)).astype(np.float32)[pos]
    meta = {"seq_len": L, "layer": LAYER, "split": split, "hash": f"prior-{split}",
            "settings": store_settings(cfg, LAYER)}
    return write_store(path, x, np.zeros(len(pos), np.int32), pos, seq, meta, stats_from=stats_from)


def files(*roots: Path) -> dict[Path, tuple[str, int]]:
    """Every product under `roots`: content hash and modification time (lock files, which name their
    last holder, are not products)."""
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.endswith(".lock")}


def says(err: pytest.ExceptionInfo, *parts: str) -> str:
    """The error's message holds each part, in this order, and a fix."""
    msg = str(err.value)
    at = 0
    for part in parts:
        found = msg.find(part, at)
        assert found >= 0, f"expected {part!r} in the message (after position {at}):\n{msg}"
        at = found + len(part)
    assert "Fix: " in msg, msg
    return msg


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """The products of `prior`, made once: stores, two finished runs, a figures table."""
    root = tmp_path_factory.mktemp("prior-template")
    cfg_path = root / "prior.yaml"
    cfg_path.write_text(yaml.safe_dump(prior_yaml()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POSAE_RUNS", str(root / "runs"))
        mp.setenv("POSAE_FIGURES", str(root / "figures"))
        cfg = load_config(cfg_path)
        from posae.paths import activations_dir

        train_store = synthetic_store(activations_dir("prior", LAYER, "train"), cfg, "train", 0)
        synthetic_store(activations_dir("prior", LAYER, "val"), cfg, "val", 1, stats_from=train_store)
        train_variant(cfg, "baseline", progress=False)
        train_variant(cfg, "hierarchical", progress=False)
    (root / "figures" / "prior").mkdir(parents=True)
    (root / "figures" / "prior" / "table1.csv").write_text("variant,mse\nbaseline,0.2\n")
    return root


@pytest.fixture
def prior(template, tmp_path, monkeypatch):
    """A fresh copy of the template under POSAE_RUNS/POSAE_FIGURES, and checks that it stays untouched."""
    for name in ("runs", "figures"):
        shutil.copytree(template / name, tmp_path / name)  # copy2: modification times kept
    shutil.copy2(template / "prior.yaml", tmp_path / "prior.yaml")
    monkeypatch.setenv("POSAE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("POSAE_FIGURES", str(tmp_path / "figures"))
    p = types.SimpleNamespace(
        tmp=tmp_path, runs=tmp_path / "runs", figures=tmp_path / "figures", yaml=tmp_path / "prior.yaml",
        store=tmp_path / "runs" / "prior" / "activations" / f"layer_{LAYER}" / "train",
        baseline=tmp_path / "runs" / "prior" / "saes" / "baseline" / f"layer_{LAYER}" / "seed_0",
        hierarchical=tmp_path / "runs" / "prior" / "saes" / "hierarchical" / f"layer_{LAYER}" / "seed_0",
    )
    p.cfg = load_config(p.yaml, check_model=False)

    def config(**changes) -> Path:
        """A copy of prior.yaml with some sections changed (still named prior, so it meets its products)."""
        data = prior_yaml()
        for section, values in changes.items():
            data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
        path = tmp_path / "changed.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def rebase() -> None:
        p.before = files(p.runs, p.figures)

    def assert_untouched() -> None:
        after = files(p.runs, p.figures)
        changed = sorted(str(f.relative_to(tmp_path)) for f, v in p.before.items() if after.get(f) != v)
        assert not changed, f"deleted or overwritten: {changed}"
        assert not [f for f in p.runs.rglob(".*") if f.name.endswith(".tmp")], "a temporary file was left behind"

    p.config, p.rebase, p.assert_untouched = config, rebase, assert_untouched
    rebase()
    assert p.store.is_dir() and checkpoint.read_info(p.baseline)["done"] and checkpoint.read_info(p.hierarchical)["done"]
    return p


# --------------------------------------------------------------------------- 1-8, 18, 19: the config file


def test_01_unknown_key(prior):
    path = prior.config(train={"stpes": 5})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    says(err, f"{path}: train.stpes: unknown key. Fix: remove it or use one of: seeds, steps, ")
    prior.assert_untouched()


def test_02_unknown_variant(prior):
    known = ", ".join(sorted(REGISTRY))
    with pytest.raises(ConfigError) as err:
        train_variant(prior.cfg, "hierarchial", progress=False)
    assert str(err.value) == f"unknown variant 'hierarchial'. Fix: use one of {known}"
    path = prior.config(sae={"options": {"contrastve": {"temperature": 0.1}}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: sae.options.contrastve: unknown variant. Fix: use one of {known}"
    prior.assert_untouched()


def test_03_wrong_type(prior):
    path = prior.config(corpus={"seq_len": "long"})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: corpus.seq_len: expected an integer, got 'long'. Fix: write a whole number"
    prior.assert_untouched()


def test_04_out_of_range_value(prior):
    path = prior.config(train={"lr_warmup": 1.5})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: train.lr_warmup: 1.5 is above the maximum 1.0. Fix: use a value <= 1.0"
    prior.assert_untouched()


def test_05_layer_beyond_the_model(prior):
    path = prior.config(capture={"layers": [1, 4]})  # the smoke model has blocks 0..3
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: capture.layers has 4, but random has 4 layers (0..3). "
                              "Fix: use layers below 4")
    prior.assert_untouched()


def test_06_missing_corpus_files(prior):
    gone = prior.tmp / "speeches"
    path = prior.config(corpus={"name": str(gone)})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: corpus.name: no folder {str(gone)!r}. "
                              "Fix: give the path of a folder of .txt files")
    prior.assert_untouched()


def test_07_empty_corpus(prior):
    folder = prior.tmp / "texts"
    folder.mkdir()
    path = prior.config(corpus={"name": str(folder)})
    with pytest.raises(ConfigError) as err:  # no .txt file at all: refused when the config loads
        load_config(path)
    says(err, f"{path}: corpus.name: folder {folder} holds no .txt files. Fix: put one document per .txt file")
    for name in ("a.txt", "b.txt"):  # files, but no text: refused by the capture, before the model loads
        (folder / name).write_text("")
    cfg = load_config(path)
    with pytest.raises(ConfigError) as err:
        capture(cfg, progress=False)
    says(err, f"{path}: corpus {str(folder)!r} gives only 0 sequences of 32 tokens", "from 0 documents",
         "but the config asks for n_train 48 + n_val 32. Fix: lower corpus.n_train")
    prior.assert_untouched()


def test_08_sequence_length_beyond_the_context(prior):
    path = prior.config(corpus={"seq_len": 1024})  # the smoke model's context is 512
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: corpus.seq_len 1024 exceeds random's context of 512 tokens. "
                              "Fix: use a seq_len <= 512")
    prior.assert_untouched()


def test_18_invalid_yaml(prior):
    path = prior.tmp / "broken.yaml"
    path.write_text("train: {steps: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    says(err, f"{path}: not valid YAML (", "). Fix: correct the syntax")
    prior.assert_untouched()


def test_19_unknown_config_name(prior):
    with pytest.raises(ConfigError) as err:
        setup("smoek")
    known = ", ".join(sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")))
    assert str(err.value) == f"config 'smoek': no file {PARAMS_DIR / 'smoek.yaml'}. Fix: use one of {known}"
    prior.assert_untouched()


# --------------------------------------------------------------------------- 9, 10, 20-22: the activation stores


def test_09_corrupt_store(prior):
    acts = prior.store / "acts.npy"
    acts.write_bytes(acts.read_bytes()[:1000])  # a truncated copy, as a full disk or a bad copy leaves
    prior.rebase()
    with pytest.raises(StoreError) as err:
        train_variant(prior.cfg, "residual", progress=False)
    says(err, f"{acts}: unreadable or truncated (", "). Fix: delete the folder and capture again")
    prior.assert_untouched()


def test_10_stale_store(prior):
    path = prior.config(corpus={"seq_len": 24})  # changed since the stores were captured at 32
    with pytest.raises(StoreError) as err:
        train_variant(load_config(path), "baseline", progress=False)
    assert str(err.value) == (
        f"{prior.store}: stale store: captured with corpus.seq_len = 32, but {path} now says 24. "
        "Fix: run notebooks/01_capture_activations.ipynb for this config (it recaptures the stale stores only)")
    prior.assert_untouched()  # the finished baseline run was neither retrained nor removed


def test_20_missing_store(prior):
    shutil.rmtree(prior.store)
    prior.rebase()
    with pytest.raises(StoreError) as err:
        train_variant(prior.cfg, "baseline", progress=False)
    assert str(err.value) == (f"{prior.store}: no complete activation store here (meta.json missing). "
                              "Fix: run notebooks/01_capture_activations.ipynb for this config")
    prior.assert_untouched()


def test_21_batch_larger_than_the_store(prior):
    path = prior.config(train={"batch_size": 4096})
    with pytest.raises(ConfigError) as err:
        train_variant(load_config(path), "baseline", progress=False)
    assert str(err.value) == (f"{path}: train.batch_size 4096 exceeds the 600 training tokens of {prior.store}. "
                              "Fix: lower train.batch_size")
    prior.assert_untouched()


def test_22_layer_not_captured(prior):
    with pytest.raises(ConfigError) as err:
        train_variant(prior.cfg, "baseline", layers=[2], progress=False)
    assert str(err.value) == f"{prior.yaml}: layer 2 is not captured. Fix: use one of [1]"
    prior.assert_untouched()


# --------------------------------------------------------------------------- 11-13: checkpoints and training


def test_11_checkpoint_from_another_variant(prior):
    # Training baseline into a folder that holds a hierarchical run would replace it: refused.
    with pytest.raises(CheckpointMismatch) as err:
        train.train_run(variant_config(prior.cfg, "baseline"), "baseline", LAYER, 0,
                        open_layer_stores(prior.cfg, "train")[LAYER], progress=False, out=prior.hierarchical)
    assert str(err.value) == (
        f"{prior.hierarchical}: this run folder holds a hierarchical SAE, not baseline, and training baseline here "
        f"would replace it. Fix: train baseline into its own folder (posae.paths.sae_dir), or delete "
        f"{prior.hierarchical} if the hierarchical run is not wanted")
    # A weights file copied in from another variant's run: load_sae names both variants.
    shutil.copy2(prior.hierarchical / "weights.safetensors", prior.baseline / "weights.safetensors")
    prior.rebase()
    with pytest.raises(CheckpointMismatch) as err:
        checkpoint.load_sae(prior.baseline)
    assert str(err.value) == (
        f"{prior.baseline}: weights.safetensors holds a hierarchical SAE, but config.json describes a baseline "
        "SAE. Fix: the two files come from different runs; delete the folder and train it again")
    prior.assert_untouched()


def test_12_checkpoint_of_another_shape(prior):
    weights = prior.baseline / "weights.safetensors"
    tensors = load_file(str(weights))
    tensors["W_enc_DK"] = torch.zeros(D, 2 * D)  # as an expansion-2 run of the same variant saves it
    save_file(tensors, str(weights), metadata={"variant": "baseline", "format": "1"})
    prior.rebase()
    with pytest.raises(CheckpointMismatch) as err:
        checkpoint.load_sae(prior.baseline)
    assert str(err.value) == (
        f"{prior.baseline}: weights.safetensors does not fit the baseline SAE of config.json (d_model 16, k 16): "
        "W_enc_DK has shape [16, 32] in the weights, [16, 16] expected. Fix: the two files come from different "
        "runs; delete the folder and train it again")
    prior.assert_untouched()


@pytest.mark.parametrize("fault, step", [("nan loss", 15), ("inf loss", 15), ("nan weights", 20), ("nan loss", 5)])
def test_13_nan_or_inf_during_training(prior, monkeypatch, fault, step):
    """The run stops at the step that went wrong; the checkpoint of step 10, if written, stays as it was."""
    real_objective, real_resample = train.objective, train.maybe_resample

    def objective(out, x_BD, pos_B, tcfg, at, seq_len):
        terms, err_sq_B, mass_K = real_objective(out, x_BD, pos_B, tcfg, at, seq_len)
        if at + 1 >= step:  # `at` counts from 0, steps are reported from 1
            terms["total"] = terms["total"] * (float("inf") if fault == "inf loss" else float("nan"))
        return terms, err_sq_B, mass_K

    def resample(state, stats, tcfg, seed):
        if state.step == step:  # the weights go bad after the last step, just before the final checkpoint
            with torch.no_grad():
                state.sae.W_dec_KD[0, 0] = float("nan")
        return real_resample(state, stats, tcfg, seed)

    if fault == "nan weights":
        monkeypatch.setattr(train, "maybe_resample", resample)
    else:
        monkeypatch.setattr(train, "objective", objective)
    out = sae_dir("prior", "residual", LAYER, 0)
    kept = {}
    real_save = checkpoint.save_run

    def save_run(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)
        kept.update(files(folder))

    monkeypatch.setattr(checkpoint, "save_run", save_run)
    with pytest.raises(TrainingDiverged) as err:
        train_variant(prior.cfg, "residual", progress=False)
    where = (f"the last good checkpoint (step 10) is kept in {out}" if step > 10
             else f"no checkpoint of this run was written ({out} is left as it was)")
    assert str(err.value) == (
        f"residual layer 1 seed 0: the loss or the weights turned NaN or infinite at step {step}, so training "
        f"stopped without saving them; {where}. Fix: lower train.lr (now 0.01) or lengthen train.lr_warmup, and "
        f"check the activation store {prior.store} for extreme values (abs_max in its meta.json)")
    if step > 10:
        info = checkpoint.read_info(out)
        assert (info["step"], info["done"]) == (10, False) and files(out) == kept
        assert all(torch.isfinite(v).all() for v in checkpoint.load_sae(out).state_dict().values())
    else:
        assert not out.exists() and not kept
    prior.assert_untouched()


# --------------------------------------------------------------------------- 14, 15: the disk


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_14_full_disk_keeps_the_previous_products(prior, monkeypatch):
    fix = "Fix: free disk space, or set POSAE_RUNS to a folder on a larger disk, and rerun (finished products are reused)"
    # A checkpoint of a retraining (the config changed) fails to write: the finished run stays whole.
    monkeypatch.setattr(checkpoint, "save_file", _no_space)
    with pytest.raises(OSError) as err:
        train_variant(load_config(prior.config(train={"steps": 12})), "baseline", progress=False)
    assert err.value.errno == errno.ENOSPC
    says(err, f"{prior.baseline}: no space left on the device while writing it (No space left on device); the "
              f"previous version, if any, is kept. {fix}")
    monkeypatch.undo()
    # An activation store being rewritten runs out of space midway: the old store stays whole.
    from posae.data import store as store_module

    real_write, calls = store_module._NpyAppender.write, {"n": 0}

    def write_then_fail(self, arr):
        calls["n"] += 1
        if calls["n"] > 3:
            _no_space()
        real_write(self, arr)

    monkeypatch.setattr(store_module._NpyAppender, "write", write_then_fail)
    with pytest.raises(OSError) as err:
        synthetic_store(prior.store, prior.cfg, "train", 7)
    says(err, f"{prior.store}: no space left on the device while writing it", fix)
    monkeypatch.undo()
    # A table or figure written with atomic_path: the old file stays.
    table = prior.figures / "prior" / "table1.csv"
    with pytest.raises(OSError) as err:
        with atomic_path(table) as tmp:
            tmp.write_text("half a tab")
            _no_space()
    says(err, f"{table}: no space left on the device while writing it", fix)
    prior.assert_untouched()
    assert not [f for f in prior.figures.rglob(".*") if f.name.endswith(".tmp")]


def test_15_unwritable_output_folder(prior, monkeypatch):
    blocker = prior.tmp / "not-a-folder"
    blocker.write_text("a file where the runs folder should be\n")
    monkeypatch.setenv("POSAE_RUNS", str(blocker / "runs"))
    with pytest.raises(OutputNotWritable) as err:
        setup(str(prior.yaml))
    says(err, f"{blocker / 'runs' / 'prior'}: cannot write the run's products here (Not a directory: ",
         "). Fix: make the folder writable, or set POSAE_RUNS to a writable folder")
    monkeypatch.setattr("posae.pipeline.driver.execute", lambda *a: pytest.fail("a stage ran"))
    with pytest.raises(OutputNotWritable, match="cannot write the run's products here"):
        reproduce(str(prior.yaml), log=lambda line: None)
    # Where the probe file cannot be created (a read-only disk; chmod does not stop root, so simulated).
    monkeypatch.setenv("POSAE_RUNS", str(prior.runs))
    monkeypatch.setattr("posae.paths.tempfile.mkstemp", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system", str(prior.runs / "prior"))))
    with pytest.raises(OutputNotWritable) as err:
        setup(str(prior.yaml))
    says(err, f"{prior.runs / 'prior'}: cannot write the run's products here (Read-only file system: ")
    prior.assert_untouched()


# --------------------------------------------------------------------------- 16, 17: notebooks and papermill


def test_16_notebook_parameter_of_the_wrong_type(prior):
    with pytest.raises(ConfigError) as err:
        setup(5)  # papermill -p config 5
    assert str(err.value) == (
        "parameter config: expected a config name or a YAML path, got 5 (int). Fix: pass a string such as "
        "'smoke'; papermill's -p reads a number as a number, -r config <value> passes it as a string")
    with pytest.raises(ConfigError) as err:
        train_variant(prior.cfg, 3, progress=False)  # papermill -p variant 3
    assert str(err.value) == ("parameter variant: expected a string, got 3. "
                              "Fix: give a variant name, e.g. papermill -p variant contrastive")
    with pytest.raises(ConfigError) as err:
        train_variant(prior.cfg, "baseline", layers=1, progress=False)  # papermill -p layers 1
    assert str(err.value) == 'parameter layers: expected a list, got 1. Fix: give a list, e.g. papermill -y "layers: [8]"'
    with pytest.raises(ConfigError) as err:
        train_variant(prior.cfg, "baseline", seeds=["0"], progress=False)  # papermill -y "seeds: ['0']"
    assert str(err.value) == ("parameter seeds[0]: expected an integer, got '0'. "
                              'Fix: give a list, e.g. papermill -y "seeds: [0]"')
    with pytest.raises(ConfigError) as err:
        as_variant_list(3)  # 04_probe: papermill -p variants 3
    says(err, "parameter variants: expected a list, got 3. Fix: give a list or a comma-separated string")
    prior.assert_untouched()


def test_17_papermill_from_another_working_directory(prior, monkeypatch):
    """A relative config path is found from anywhere (working directory, then the repository root),
    products go under runs/, never the working directory, and a bad parameter stops the kernel."""
    elsewhere = prior.tmp / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError) as err:
        setup("params/smoek.yaml")
    assert str(err.value) == (f"params/smoek.yaml: no such config file (looked in {elsewhere} and {REPO_ROOT}). "
                              f"Fix: give a path to a YAML file or a name from {PARAMS_DIR}")
    out = prior.tmp / "03_train-executed.ipynb"
    result = subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOKS_DIR / "03_train.ipynb"), str(out),
         "-p", "config", "params/smoke.yaml", "-p", "variant", "3", "--no-progress-bar"],
        cwd=elsewhere, env={**os.environ, "POSAE_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert ("parameter variant: expected a string, got 3. Fix: give a variant name, e.g. papermill -p variant "
            "contrastive") in result.stderr + result.stdout
    machine = json.loads((prior.runs / "smoke" / "environment" / "machine.json").read_text())
    assert machine["config_source"] == str(REPO_ROOT / "params" / "smoke.yaml")  # resolved from the repo root
    assert list(elsewhere.iterdir()) == [], "products belong under runs/, not the working directory"
    assert out.exists()  # papermill keeps the failed notebook, with the error in it
    # The driver's kernels run in notebooks/: a config outside params/ reaches them as an absolute path.
    assert stage_list(load_config("smoke"))[0].parameters["config"] == "smoke"
    assert stage_list(load_config(prior.yaml))[0].parameters["config"] == str(prior.yaml.resolve())
    prior.assert_untouched()


# --------------------------------------------------------------------------- 23-28: values that pass a type check and cannot work


@pytest.mark.parametrize("changes, where, shown", [
    ({"train": {"lr_warmup": float("nan")}}, "train.lr_warmup", "nan"),  # once silently disabled the warm-up
    ({"train": {"l1": float("nan")}}, "train.l1", "nan"),  # once ended in a divergence advising a lower lr
    ({"train": {"lr": float("inf")}}, "train.lr", "inf"),
    ({"probe": {"test_fraction": float("-inf")}}, "probe.test_fraction", "-inf"),
    ({"train": {"betas": [0.9, float("nan")]}}, "train.betas[1]", "nan"),
], ids=["lr_warmup-nan", "l1-nan", "lr-inf", "test_fraction-minus-inf", "betas-nan"])
def test_23_nan_or_infinity(prior, changes, where, shown):
    path = prior.config(**changes)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: {where}: {shown} is not a finite number (YAML .nan or .inf). "
                              "Fix: write a finite number such as 0.1")
    prior.assert_untouched()


def test_23_nan_in_a_variant_option(prior):
    path = prior.config(sae={"options": {"contrastive": {"temperature": float("nan")}}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{saes.variant_path('contrastive')} + {path}: sae.options.temperature: nan is not a "
                              "finite number (YAML .nan or .inf). Fix: write a finite number such as 0.1")
    prior.assert_untouched()


def test_24_a_key_given_twice(prior, monkeypatch):
    # A second top-level train: block once replaced the first whole, silently.
    text = prior.yaml.read_text()
    first = text.splitlines().index("train:") + 1
    path = prior.tmp / "twice.yaml"
    path.write_text(text + "train:\n  steps: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: train: key given twice on lines {first} and {len(text.splitlines()) + 1}; "
                              "YAML would keep only the second, silently dropping the first. "
                              "Fix: write train once, merging the two")
    # Inside a section, and inside a flow mapping on one line.
    path.write_text("name: prior\nsae:\n  buckets: 4\n  heads: 2\n  buckets: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    says(err, f"{path}: sae.buckets: key given twice on lines 3 and 5;", "Fix: write sae.buckets once")
    path.write_text("name: prior\nsae:\n  options:\n    contrastive: {temperature: 0.1, temperature: 0.2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    says(err, f"{path}: sae.options.contrastive.temperature: key given twice on line 4;")
    # In a variant file (params/variants/<v>.yaml, read through the same loader).
    variant_file = prior.tmp / "soft_masking.yaml"
    variant_file.write_text("train:\n  l1_scale: 0.4\n  l1_scale: 2.0\n")
    real = saes.variant_path
    monkeypatch.setattr(saes, "variant_path", lambda name: {"soft_masking": variant_file}.get(name) or real(name))
    with pytest.raises(ConfigError) as err:
        load_config(prior.yaml)
    says(err, f"{variant_file}: train.l1_scale: key given twice on lines 2 and 3;", "Fix: write train.l1_scale once")
    prior.assert_untouched()


@pytest.mark.parametrize("changes, message", [
    # The schema's own maximum once crashed the probe stage after all the training.
    ({"probe": {"test_fraction": 1.0}}, "probe.test_fraction: 1.0 is at the excluded bound 1.0, which cannot work. "
                                        "Fix: use a value < 1.0"),
    ({"probe": {"test_fraction": 0.0}}, "probe.test_fraction: 0.0 is at the excluded bound 0.0, which cannot work. "
                                        "Fix: use a value > 0.0"),
    ({"probe": {"test_fraction": 0.99}}, "probe.test_fraction 0.99 of corpus.n_val 32 sequences holds out 32, leaving "
                                         "no validation sequence to train the probes on. Fix: lower "
                                         "probe.test_fraction to at most 0.968, or raise corpus.n_val"),
    ({"corpus": {"n_val": 1}}, "corpus.n_val: 1 is below the minimum 2. Fix: use a value >= 2"),
    ({"train": {"lr": 0}}, "train.lr: 0.0 is at the excluded bound 0.0, which cannot work. Fix: use a value > 0.0"),
], ids=["test_fraction-1", "test_fraction-0", "test_fraction-0.99", "n_val-1", "lr-0"])
def test_25_a_value_at_a_bound_that_cannot_work(prior, changes, message):
    path = prior.config(**changes)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}"
    prior.assert_untouched()


@pytest.mark.parametrize("changes, message", [
    # [-1] once failed inside numpy at step 1.
    ({"train": {"seeds": [-1]}}, "train.seeds[0]: -1 is below the minimum 0. Fix: use a value >= 0"),
    ({"train": {"seeds": [0, 2**31]}}, "train.seeds[1]: 2147483648 is above the maximum 2147483647. "
                                       "Fix: use a value <= 2147483647"),
    ({"train": {"seeds": [1, 1]}}, "train.seeds [1, 1] repeats a seed. Fix: list each seed once"),
    ({"probe": {"seed": -3}}, "probe.seed: -3 is below the minimum 0. Fix: use a value >= 0"),
    ({"corpus": {"seed": -1}}, "corpus.seed: -1 is below the minimum 0. Fix: use a value >= 0"),
], ids=["negative", "too-large", "repeated", "probe-seed", "corpus-seed"])
def test_26_bad_seed(prior, changes, message):
    path = prior.config(**changes)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}"
    prior.assert_untouched()


NAME_FIX = ("Fix: use a plain folder name of letters, digits, '_', '.' and '-' (no '/', no '..'), e.g. name: my_run; "
            "without a name: key the file's name is used")


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "runs/escaped", "..", ".hidden", "-x", "a b"])
def test_27_config_name_that_is_not_a_plain_folder_name(prior, name):
    # '../escaped' or an absolute path once wrote runs and figures outside runs/ and figures/.
    path = prior.config(name=name)
    with pytest.raises(ConfigError) as err:
        setup(str(path))
    assert str(err.value) == f"{path}: name: {name!r} is not a plain name. {NAME_FIX}"
    assert sorted(p.name for p in prior.tmp.iterdir()) == ["changed.yaml", "figures", "prior.yaml", "runs"]
    assert sorted(p.name for p in prior.runs.iterdir()) == ["prior"]
    prior.assert_untouched()


def test_27_a_file_name_that_is_not_a_plain_name_needs_a_name_key(prior):
    path = prior.tmp / "my run.yaml"  # without name:, the config is named after its file
    data = yaml.safe_load(prior.yaml.read_text())
    del data["name"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: name: 'my run' is not a plain name. {NAME_FIX}"
    data["name"] = "my_run"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path, check_model=False).name == "my_run"
    prior.assert_untouched()


@pytest.mark.parametrize("expansion, message", [
    # expansion 0 once trained k = 1 silently.
    (0, "sae.expansion: 0.0 is at the excluded bound 0.0, which cannot work. Fix: use a value > 0.0"),
    (0.01, "sae.expansion 0.01 gives the attention_routing SAE k = 1 features (d = 64), which it cannot use: k = 1 "
           "features is too few: probes and ablations split every dictionary into a global and a position half. "
           "Fix: raise sae.expansion to at least 0.0312 (k = expansion x d, d = 64)"),
    (65 / 64, "sae.expansion 1.015625 gives the attention_routing SAE k = 65 features (d = 64), which it cannot use: "
              "the dictionary size k = 65 must be even to split into a global and a position half. Fix: choose "
              "sae.expansion so that expansion x 64 is even"),
    (6 / 64, "sae.expansion 0.09375 gives the position_masking SAE k = 6 features (d = 64), which it cannot use: its 3 "
             "position features (half of k = 6) cannot fill 4 buckets. Fix: raise sae.expansion or lower sae.buckets"),
], ids=["zero", "k-1", "odd-k", "fewer-position-features-than-buckets"])
def test_28_dictionary_size_a_variant_cannot_take(prior, expansion, message):
    path = prior.config(sae={"expansion": expansion})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}"
    prior.assert_untouched()


def test_28_each_variant_states_its_own_constraint_through_the_registry(prior, monkeypatch):
    class NeedsTen(REGISTRY["baseline"]):
        @classmethod
        def size_problem(cls, k, d_model, sae_cfg):
            return None if k % 10 == 0 else f"k = {k} is not a multiple of 10. Fix: make it one"

    NeedsTen.name = "needs_ten"
    monkeypatch.setitem(REGISTRY, "needs_ten", NeedsTen)
    with pytest.raises(ConfigError) as err:
        load_config(prior.yaml)
    assert str(err.value) == (f"{prior.yaml}: sae.expansion 1.0 gives the needs_ten SAE k = 64 features (d = 64), "
                              "which it cannot use: k = 64 is not a multiple of 10. Fix: make it one")
    prior.assert_untouched()


# --------------------------------------------------------------------------- 29, 31: the command line


KNOWN = ", ".join(sorted(REGISTRY))


def stage_names(*names: str) -> str:
    return ", ".join(sorted({*names, "train", "ground_truth", "capture", "structure", "probe", "ablations", "inspect", "figures"}))


BAD_ARGUMENTS = [
    # --variants foo was once refused only after the capture stage (~3 minutes on the default config).
    (["--variants", "foo"], dict(variants=["foo"]), ConfigError,
     f"--variants: unknown variant 'foo'. Fix: use one of {KNOWN}"),
    (["--variants", "baseline,foo"], dict(variants=["baseline", "foo"]), ConfigError,
     f"--variants: unknown variant 'foo'. Fix: use one of {KNOWN}"),
    (["--variants", ""], dict(variants=[]), ConfigError,
     f"--variants names no variant. Fix: give one or more of {KNOWN}, comma-separated, or leave --variants out to "
     "train them all"),
    (["--variants", "baseline,baseline"], dict(variants=["baseline", "baseline"]), ConfigError,
     "--variants names baseline twice. Fix: name each variant once"),
    (["--only", "trian"], dict(only=("trian",)), UnknownStage,
     f"unknown stage 'trian'. Fix: use one of {stage_names(*(f'train:{v}' for v in REGISTRY))}"),
    (["--variants", "baseline", "--force", "train:hierarchical"], dict(variants=["baseline"], force=("train:hierarchical",)),
     UnknownStage, f"unknown stage 'train:hierarchical'. Fix: use one of {stage_names('train:baseline')}"),
    (["--only", "probe", "--force", "capture"], dict(only=("probe",), force=("capture",)), UnknownStage,
     "--force capture: --only probe leaves that stage out, so it would not run. Fix: add it to --only, or drop it "
     "from --force"),
    # --jobs 0 was once silently 1.
    (["--jobs", "0"], dict(jobs=0), ExecutorError,
     "--jobs 0: at least one training notebook must run at a time. Fix: pass --jobs 1 or more, or leave it out for "
     f"one per core ({os.cpu_count()})"),
    (["--jobs", "-2"], dict(jobs=-2), ExecutorError, "--jobs -2: at least one training notebook must run at a time."),
    (["--workers", "0"], dict(workers=0), ExecutorError,
     "--scheduler and --workers belong to the Dask executor. Fix: add --executor dask"),
    (["--executor", "dask", "--workers", "0"], dict(executor="dask", workers=0), ExecutorError,
     f"--workers 0: need at least 1 worker. Fix: pass --workers 1 or more, or leave it out for one per core "
     f"({os.cpu_count()})"),
]
BAD_ARGUMENT_IDS = ["unknown-variant", "unknown-among-known", "no-variant", "repeated-variant", "unknown-only",
                    "force-outside-variants", "force-outside-only", "jobs-0", "jobs-negative", "workers-local", "workers-0"]


CLI_CASES = [BAD_ARGUMENT_IDS.index(i) for i in ("unknown-variant", "no-variant", "unknown-only", "jobs-0", "workers-0")]


def assert_nothing_ran(prior) -> None:
    assert not (prior.runs / "prior" / "stages").exists() and not (prior.runs / "prior" / "notebooks").exists()
    assert not (prior.figures / "prior" / "notebooks").exists()
    prior.assert_untouched()


@pytest.mark.parametrize("argv, kwargs, error, message", BAD_ARGUMENTS, ids=BAD_ARGUMENT_IDS)
def test_29_bad_driver_arguments_are_refused_before_stage_1(prior, monkeypatch, argv, kwargs, error, message):
    monkeypatch.setattr("posae.pipeline.driver.execute", lambda *a: pytest.fail("a stage ran"))
    with pytest.raises(error) as err:
        reproduce(str(prior.yaml), log=lambda line: None, **kwargs)
    assert str(err.value).startswith(message) and "Fix: " in str(err.value)
    assert_nothing_ran(prior)


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posae", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "POSAE_THREADS": "1"})


def assert_one_line(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert "Fix: " in result.stderr


@pytest.mark.parametrize("argv, kwargs, error, message", [BAD_ARGUMENTS[i] for i in CLI_CASES],
                         ids=[BAD_ARGUMENT_IDS[i] for i in CLI_CASES])
def test_29_the_cli_says_so_in_one_line_and_exits_2(prior, argv, kwargs, error, message):
    assert_one_line(run_cli("reproduce", "--config", str(prior.yaml), *argv), 2, message)
    assert_nothing_ran(prior)


def test_29_a_bad_config_value_reaches_the_terminal_as_one_line(prior):
    path = prior.config(train={"seeds": [-1]})
    assert_one_line(run_cli("reproduce", "--config", str(path)), 2,
                    f"{path}: train.seeds[0]: -1 is below the minimum 0. Fix: use a value >= 0")
    assert_nothing_ran(prior)


def _raise(error: BaseException):
    def fail(*args, **kwargs):
        raise error
    return fail


def _known_errors(prior) -> list[tuple[BaseException, int, str]]:
    """Errors the CLI prints as one line: (error, exit code, the line after 'error: ')."""
    fix = "Fix: free disk space"
    return [
        (OutputNotWritable(errno.EACCES, f"{prior.runs}: cannot write the run's products here. Fix: make it writable"),
         2, f"{prior.runs}: cannot write the run's products here. Fix: make it writable"),
        (OSError(errno.ENOSPC, "No space left on device", str(prior.store / "acts.npy")), 1,
         f"{prior.store / 'acts.npy'}: no space left on the device while writing it (No space left on device); the "
         f"previous version, if any, is kept. {fix}"),
        (OSError(errno.EDQUOT, f"{prior.store}: no space left on the device while writing it. {fix}"), 1,
         f"{prior.store}: no space left on the device while writing it. {fix}"),
        (ExportError("out: read-only. Fix: choose a writable OUT_DIR"), 2, "out: read-only. Fix: choose a writable OUT_DIR"),
        (StoreError(f"{prior.store}: stale store. Fix: recapture"), 2, f"{prior.store}: stale store. Fix: recapture"),
        (CheckpointMismatch(f"{prior.baseline}: another shape. Fix: retrain"), 2,
         f"{prior.baseline}: another shape. Fix: retrain"),
        (Busy("pid 1 holds the lock. Fix: wait for it"), 2, "pid 1 holds the lock. Fix: wait for it"),
        (TrainingDiverged("baseline layer 1 seed 0: NaN at step 3. Fix: lower train.lr"), 1,
         "baseline layer 1 seed 0: NaN at step 3. Fix: lower train.lr"),
    ]


@pytest.mark.parametrize("case", range(8), ids=["unwritable", "disk-full", "quota-explained", "export", "store",
                                                "checkpoint", "busy", "diverged"])
def test_31_known_errors_are_one_line_and_the_rest_keep_their_traceback(prior, monkeypatch, capsys, case):
    error, code, line = _known_errors(prior)[case]
    monkeypatch.setattr("posae.data.capture.capture", _raise(error))
    assert main(["capture", "--config", str(prior.yaml)]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"error: {line}") and err.count("\n") == 1 and "Fix: " in err, err
    monkeypatch.setattr("posae.data.capture.capture", _raise(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="Input/output error"):  # unexpected: the traceback is kept
        main(["capture", "--config", str(prior.yaml)])
    prior.assert_untouched()


def test_31_an_unwritable_output_folder_is_one_line_from_the_cli(prior):
    blocker = prior.tmp / "not-a-folder"
    blocker.write_text("a file where the runs folder should be\n")
    result = subprocess.run([sys.executable, "-m", "posae", "reproduce", "--config", str(prior.yaml)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "POSAE_RUNS": str(blocker / "runs"), "POSAE_THREADS": "1"})
    assert_one_line(result, 2, f"{blocker / 'runs' / 'prior'}: cannot write the run's products here (Not a directory")
    prior.assert_untouched()


def test_help_imports_no_torch():
    code = "import sys; from posae.__main__ import main\ntry: main(['--help'])\nexcept SystemExit: pass\n" \
           "print('torch' in sys.modules, file=sys.stderr)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stderr.strip() == "False" and "reproduce" in result.stdout


# --------------------------------------------------------------------------- 30: export-saelens --force


def test_30_export_force_refuses_runs_and_stores(prior, monkeypatch, capsys):
    # `export-saelens SRC runs/<config>/saes/residual --force` once deleted four trained runs.
    elsewhere = prior.tmp / "elsewhere"
    shutil.copytree(prior.hierarchical, elsewhere / "copied" / "seed_0")
    shutil.copytree(prior.store, prior.tmp / "stores" / "train")
    fix = ("Fix: choose an OUT_DIR that holds no products of the pipeline and lies outside runs/, e.g. "
           "exports/<name>; --force is for replacing an earlier export")
    runs = prior.runs.resolve()
    cases = [
        (prior.hierarchical.parent.parent, f"it is inside the runs folder {runs}, which holds every config's products"),
        (prior.store.parent, f"it is inside the runs folder {runs}, which holds every config's products"),
        (elsewhere, f"it holds a trained SAE run, {(elsewhere / 'copied' / 'seed_0').resolve()}"),
        (prior.tmp / "stores", f"it holds an activation store, {(prior.tmp / 'stores' / 'train').resolve()}"),
    ]
    prior.rebase()
    before = files(elsewhere, prior.tmp / "stores")
    for out, why in cases:
        with pytest.raises(ExportError) as err:
            export_saelens(prior.baseline, out, force=True)
        assert str(err.value) == f"{out}: --force would delete it, but {why}. {fix}"
    # A folder that holds a runs root (say, the repository itself), with POSAE_RUNS pointed inside it.
    outer = prior.tmp / "outer"
    (outer / "runs").mkdir(parents=True)
    monkeypatch.setenv("POSAE_RUNS", str(outer / "runs"))
    with pytest.raises(ExportError) as err:
        export_saelens(prior.baseline, outer, force=True)
    assert str(err.value) == (f"{outer}: --force would delete it, but it holds the runs folder "
                              f"{(outer / 'runs').resolve()}, which holds every config's products. {fix}")
    assert (outer / "runs").is_dir()
    monkeypatch.setenv("POSAE_RUNS", str(prior.runs))
    out, why = cases[0]
    assert main(["export-saelens", "--force", str(prior.baseline), str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out}: --force would delete it, but {why}. {fix}\n"
    assert files(elsewhere, prior.tmp / "stores") == before
    # The repository's own runs/ counts whatever POSAE_RUNS says; nothing there is touched to find out.
    assert pipeline_products((REPO_ROOT / "runs" / "smoke").resolve()).startswith("it is inside the runs folder")
    prior.assert_untouched()
