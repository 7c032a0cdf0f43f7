"""SAELens export, the parts that need no sae-lens: which variants refuse and why, and every refusal
before anything is written. The round trip through sae-lens is tests/test_export_saelens.py (extras)."""

import shutil
import sys

import numpy as np
import pytest
import torch

from posae import checkpoint
from posae.__main__ import main
from posae.config import Config, SAEConfig, TrainConfig
from posae.data.store import write_store
from posae.pipeline.export import ExportError, blockers, export_saelens, exportable_variants, standard_mismatch
from posae.saes import REGISTRY, build, variant_config
from posae.train import train_run

pytestmark = pytest.mark.usefixtures("one_thread")

D, L, N_SEQ = 16, 8, 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    g = np.random.default_rng(0)
    pos = np.tile(np.arange(1, L), N_SEQ).astype(np.int32)
    seq = np.repeat(np.arange(N_SEQ), L - 1).astype(np.int32)
    x = g.standard_normal((len(pos), D)) + 0.5 * g.standard_normal((L, D))[pos] + 3.0
    return write_store(tmp_path_factory.mktemp("acts") / "train", x.astype(np.float32), np.zeros(len(pos), np.int32),
                       pos, seq, {"seq_len": L, "layer": 0, "split": "train", "hash": "synthetic"})


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory):
    """A few steps of every registered variant: {variant: run folder}."""
    root = tmp_path_factory.mktemp("runs")
    cfg = Config(name="test", sae=SAEConfig(expansion=1.0, buckets=2, heads=1, head_dim=4),
                 train=TrainConfig(seeds=(0,), steps=4, batch_size=64, lr=1e-2, lr_warmup=0.0, lr_decay=0.0,
                                   checkpoint_every=100, log_every=2))
    return {name: train_run(variant_config(cfg, name), name, 0, 0, store, progress=False, out=root / name)
            for name in sorted(REGISTRY)}


def test_the_plain_relu_variants_are_exportable_and_the_position_aware_ones_are_not():
    assert "baseline" in exportable_variants() and "position_weighted" in exportable_variants()
    assert "hierarchical" not in exportable_variants()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_variant_exports_only_if_its_inference_is_the_standard_sae(name):
    sae = build(name, D, SAEConfig(expansion=1.0, buckets=2, heads=1, head_dim=4), L, seed=0)
    if name in exportable_variants():
        assert blockers(sae) == [] and standard_mismatch(sae) is None
    else:
        assert blockers(sae)


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - set(exportable_variants())))
def test_a_position_aware_variant_refuses_naming_itself_and_why_before_writing(name, runs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ExportError) as e:
        export_saelens(runs[name], out)
    msg = str(e.value)
    assert msg.startswith(f"{name} cannot be exported to SAELens: ")
    assert "no token position" in msg and "Variants that export: baseline" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_standard_mismatch_catches_a_forward_changed_without_overriding_a_method():
    sae = build("baseline", D, SAEConfig(expansion=1.0), L, seed=0)
    sae.register_forward_hook(lambda module, args, out: out._replace(x_hat=out.x_hat + 1.0))
    assert "reconstruction differ" in standard_mismatch(sae)


def test_refusals_about_the_folders(runs, tmp_path):
    with pytest.raises(ExportError, match="no config.json"):
        export_saelens(tmp_path / "nothing", tmp_path / "out")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not empty.*--force"):
        export_saelens(runs["baseline"], full)
    assert (full / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="overlaps the run folder"):
        export_saelens(runs["baseline"], runs["baseline"], force=True)
    with pytest.raises(ExportError, match="overlaps the run folder"):
        export_saelens(runs["baseline"], runs["baseline"].parent, force=True)
    assert checkpoint.read_info(runs["baseline"])["done"]


def test_force_refuses_a_folder_that_holds_a_run_or_a_store(runs, store, tmp_path):
    shutil.copytree(runs["hierarchical"], tmp_path / "old" / "nested" / "hierarchical")
    with pytest.raises(ExportError) as e:
        export_saelens(runs["baseline"], tmp_path / "old", force=True)
    assert str(e.value).startswith(f"{tmp_path / 'old'}: --force would delete it, but it holds a trained SAE run, "
                                   f"{(tmp_path / 'old' / 'nested' / 'hierarchical').resolve()}. Fix: ")
    shutil.copytree(store.path, tmp_path / "stores" / "train")
    with pytest.raises(ExportError, match="it holds an activation store"):
        export_saelens(runs["baseline"], tmp_path / "stores", force=True)
    assert checkpoint.read_info(tmp_path / "old" / "nested" / "hierarchical")["done"]
    assert (tmp_path / "stores" / "train" / "meta.json").exists()


def test_an_unfinished_run_refuses(runs, tmp_path):
    run = tmp_path / "run"
    info = {**checkpoint.read_info(runs["baseline"]), "done": False}
    sae = checkpoint.load_sae(runs["baseline"])
    checkpoint.save_run(run, sae, info, [], torch.zeros(D))
    with pytest.raises(ExportError, match="unfinished"):
        export_saelens(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_sae_lens_one_error_says_how_to_install_it(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # import sae_lens now raises ImportError
    with pytest.raises(ExportError, match=r"pip install -e '\.\[saelens\]'"):
        export_saelens(runs["baseline"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_cli_prints_the_refusal_and_exits_2(runs, tmp_path, capsys):
    assert main(["export-saelens", str(runs["hierarchical"]), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hierarchical cannot be exported to SAELens") and "gate" in err
    assert not (tmp_path / "out").exists()
