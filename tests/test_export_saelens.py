"""SAELens export round trip: `sae_lens.SAE.load_from_disk` reads what `export-saelens` writes and reproduces
our features and reconstruction on raw activations (the normalisation is folded into the weights, so
raw activations are the inputs where the comparison means something). Needs the saelens extra."""

import json

import numpy as np
import pytest
import torch

from posae import checkpoint
from posae.__main__ import main
from posae.config import Config, SAEConfig, TrainConfig
from posae.data.store import write_store
from posae.pipeline.export import ExportError, export_saelens, exportable_variants
from posae.saes import variant_config
from posae.train import train_run

pytestmark = [pytest.mark.extras, pytest.mark.usefixtures("one_thread")]

D, L, N_SEQ = 32, 16, 64


@pytest.fixture(scope="module")
def sae_lens():
    """Imported here, not at the top: collecting this module in the default suite must not cost sae-lens's ~8 s import."""
    try:
        import sae_lens
    except ImportError:
        pytest.fail("these tests need sae-lens. Fix: make test-extras, or pip install -e '.[saelens]'")
    return sae_lens


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Sparse codes over a planted dictionary, a per-position offset and a large shared mean, like a residual stream."""
    g = np.random.default_rng(0)
    atoms = g.standard_normal((64, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    pos = np.tile(np.arange(1, L), N_SEQ).astype(np.int32)
    seq = np.repeat(np.arange(N_SEQ), L - 1).astype(np.int32)
    codes = np.zeros((len(pos), 64))
    for _ in range(4):
        codes[np.arange(len(pos)), g.integers(0, 64, len(pos))] += g.exponential(2.0, len(pos))
    # A raw scale far from 1 and a mean far from 0, so an export that forgot either would fail.
    x = 20.0 * (codes @ atoms + 0.5 * g.standard_normal((L, D))[pos] + 0.05 * g.standard_normal((len(pos), D))) + 50.0
    return write_store(tmp_path_factory.mktemp("acts") / "train", x.astype(np.float32), np.zeros(len(pos), np.int32),
                       pos, seq, {"seq_len": L, "layer": 3, "split": "train", "hash": "synthetic"})


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory):
    """Short trainings of the exportable variants and of one that must refuse: {variant: run folder}."""
    root = tmp_path_factory.mktemp("runs")
    cfg = Config(name="test", sae=SAEConfig(expansion=2.0, buckets=4, heads=2, head_dim=8),
                 train=TrainConfig(seeds=(0,), steps=40, batch_size=128, lr=1e-2, lr_warmup=0.0, lr_decay=0.0,
                                   l1=0.05, checkpoint_every=100, log_every=10))
    return {name: train_run(variant_config(cfg, name), name, 3, 0, store, progress=False, out=root / name)
            for name in [*exportable_variants(), "soft_masking"]}


def ours_on_raw(run, x_BD):
    """Our pipeline on raw activations: normalise with the run's μ and scale, forward, map x̂ back to raw."""
    sae = checkpoint.load_sae(run)
    mean_D, scale = checkpoint.load_normalisation(run)
    with torch.no_grad():
        out = sae((x_BD - mean_D) * scale, torch.zeros(len(x_BD), dtype=torch.long))
    return out.features, out.x_hat / scale + mean_D


@pytest.mark.parametrize("name", exportable_variants())
def test_load_from_disk_reproduces_our_features_and_reconstruction(sae_lens, name, runs, store, tmp_path):
    out = export_saelens(runs[name], tmp_path / "sae")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    loaded = sae_lens.SAE.load_from_disk(str(out))
    assert isinstance(loaded, sae_lens.StandardSAE)
    assert (loaded.cfg.d_in, loaded.cfg.d_sae) == (D, 2 * D)
    x_BD = store.raw(np.arange(len(store)))  # every training token, raw
    f_ours, x_hat_ours = ours_on_raw(runs[name], x_BD)
    assert (f_ours > 0).float().sum(-1).mean() > 1  # a trained SAE with live features, not a trivial one
    with torch.no_grad():
        f_BK = loaded.encode(x_BD)
        x_hat_BD = loaded(x_BD)
    torch.testing.assert_close(f_BK, f_ours, rtol=1e-5, atol=1e-5)
    # Raw activations are ~20x larger than normalised ones; allow float32 rounding at that scale.
    torch.testing.assert_close(x_hat_BD, x_hat_ours, rtol=1e-5, atol=1e-4)
    assert torch.equal(loaded.decode(f_BK), x_hat_BD)


def test_cfg_json_is_sae_lens_own_format_with_our_metadata(sae_lens, runs, tmp_path):
    out = export_saelens(runs["baseline"], tmp_path / "sae")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "standard"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == sae_lens.__version__
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["context_size"] == L
    assert {k: meta["posae"][k] for k in ("variant", "layer", "seed")} == {"variant": "baseline", "layer": 3, "seed": 0}
    assert meta["posae"]["normalisation"]["folded"] is True
    assert meta["posae"]["config"]["train"]["steps"] == 40
    # SAELens's own metadata object gives our block back.
    assert sae_lens.SAE.load_from_disk(str(out)).cfg.metadata.posae["variant"] == "baseline"


def test_a_position_aware_variant_refuses_with_sae_lens_installed(runs, tmp_path):
    with pytest.raises(ExportError, match="^soft_masking cannot be exported to SAELens: .*mask or gate"):
        export_saelens(runs["soft_masking"], tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def test_overwrite_needs_force(runs, tmp_path):
    out = export_saelens(runs["baseline"], tmp_path / "sae")
    before = (out / "sae_weights.safetensors").read_bytes()
    with pytest.raises(ExportError, match="not empty"):
        export_saelens(runs["position_weighted"], out)
    assert (out / "sae_weights.safetensors").read_bytes() == before
    export_saelens(runs["position_weighted"], out, force=True)
    assert json.loads((out / "cfg.json").read_text())["metadata"]["posae"]["variant"] == "position_weighted"
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temporary folders left beside it


def test_the_cli_exports(sae_lens, runs, tmp_path, capsys):
    assert main(["export-saelens", str(runs["baseline"]), str(tmp_path / "sae")]) == 0
    assert "load_from_disk" in capsys.readouterr().out
    assert isinstance(sae_lens.SAE.load_from_disk(str(tmp_path / "sae")), sae_lens.StandardSAE)
    assert main(["export-saelens", str(runs["baseline"]), str(tmp_path / "sae")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export-saelens", "--force", str(runs["baseline"]), str(tmp_path / "sae")]) == 0
