"""Training: the objective, determinism, checkpoints, resume after a kill, resampling, the run folder."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from posae import checkpoint, train
from posae.config import Config, ConfigError, SAEConfig, TrainConfig
from posae.data.store import file_record, write_store
from posae.paths import activations_dir
from posae.saes import REGISTRY, build, variant_config
from posae.train import ReconLoss, batch_indices, l1_at, lr_at, train_run

pytestmark = pytest.mark.usefixtures("one_thread")

D, L, N_SEQ = 32, 16, 96
SAE_CFG = SAEConfig(expansion=2.0, buckets=4, heads=2, head_dim=8)
TRAIN_CFG = TrainConfig(seeds=(0,), steps=30, batch_size=64, lr=1e-2, lr_warmup=0.0, lr_decay=0.0, l1=0.05,
                        l1_warmup=0.0, checkpoint_every=10, log_every=5)


def synthetic_acts(n_seq: int = N_SEQ, seed: int = 0):
    """Sparse codes over a planted dictionary, plus a per-position offset and a shared mean, like a residual stream."""
    g = np.random.default_rng(seed)
    atoms = g.standard_normal((64, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    pos = np.tile(np.arange(1, L), n_seq).astype(np.int32)  # BOS (position 0) excluded
    seq = np.repeat(np.arange(n_seq), L - 1).astype(np.int32)
    codes = np.zeros((len(pos), 64))
    for _ in range(4):
        codes[np.arange(len(pos)), g.integers(0, 64, len(pos))] += g.exponential(2.0, len(pos))
    x = codes @ atoms + 0.5 * g.standard_normal((L, D))[pos] + 0.05 * g.standard_normal((len(pos), D)) + 3.0
    return x.astype(np.float32), pos, seq


def make_store(path, seed: int = 0):
    x, pos, seq = synthetic_acts(seed=seed)
    return write_store(path, x, np.zeros(len(pos), np.int32), pos, seq,
                       {"seq_len": L, "layer": 0, "split": "train", "hash": f"synthetic-{seed}"})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("acts") / "train")


def cfg_for(name: str, **train_changes) -> Config:
    cfg = Config(name="test", sae=SAE_CFG, train=dataclasses.replace(TRAIN_CFG, **train_changes))
    return variant_config(cfg, name)


def weights(folder) -> dict[str, torch.Tensor]:
    return checkpoint.load_sae(folder).state_dict()


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# --------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_recon_loss_matches_autograd(squared, dtype):
    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(50, D, generator=g).to(dtype).requires_grad_(True)
    x = torch.randn(50, D, generator=g)
    w = torch.rand(50, generator=g)
    loss_B, err_sq_B = ReconLoss.apply(x_hat, x, squared)
    (loss_B * w).sum().backward()
    fast = x_hat.grad.clone()
    x_hat.grad = None
    err = x_hat.float() - x
    naive_B = err.square().sum(-1) if squared else torch.linalg.vector_norm(err, dim=-1)
    (naive_B * w).sum().backward()
    torch.testing.assert_close(loss_B, naive_B)
    torch.testing.assert_close(err_sq_B, err.square().sum(-1))
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, x_hat.grad)


def test_position_weights_are_one_plus_t_over_L_with_mean_one():
    pos = torch.arange(1, 16)
    w = train.position_weights(pos, 16)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    torch.testing.assert_close(w / w[0], (1 + pos / 16) / (1 + 1 / 16))


def test_schedules_are_functions_of_the_step():
    tcfg = TrainConfig(steps=100, lr=1.0, lr_warmup=0.1, lr_decay=0.2, l1=0.5, l1_scale=2.0, l1_warmup=0.5)
    assert lr_at(0, tcfg) == pytest.approx(0.1) and lr_at(50, tcfg) == 1.0 and lr_at(99, tcfg) == pytest.approx(0.05)
    assert l1_at(49, tcfg) == pytest.approx(1.0) and l1_at(24, tcfg) == pytest.approx(0.5)
    assert lr_at(7, TrainConfig(lr=3e-4, lr_warmup=0.0, lr_decay=0.0)) == 3e-4


def test_lr_budget_is_the_sum_of_the_schedule_by_hand():
    # 10 steps, warm-up over 2, decay over the last 3: factors 0.5, 1 (steps 1..7), 2/3, 1/3.
    tcfg = TrainConfig(steps=10, lr=0.01, lr_warmup=0.2, lr_decay=0.3)
    assert [lr_at(s, tcfg) / 0.01 for s in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])
    assert train.lr_budget(tcfg) == pytest.approx(0.01 * (0.5 + 7 + 2 / 3 + 1 / 3)) == 0.085
    assert train.lr_budget(TrainConfig(steps=7, lr=3e-4, lr_warmup=0.0, lr_decay=0.0)) == pytest.approx(7 * 3e-4)
    # The default run: 300 steps at 2e-3, warm-up 15, decay 90: (8 + 196 + 44.5) x 2e-3 ≈ 0.5.
    default = TrainConfig(steps=300, lr=2e-3, lr_warmup=0.05, lr_decay=0.3)
    assert train.lr_budget(default) == pytest.approx(248.5 * 2e-3)


def test_batches_cover_each_epoch_once_and_depend_on_the_seed():
    epoch = np.concatenate([batch_indices(100, 20, 0, m) for m in range(5)])
    assert sorted(epoch) == list(range(100))
    assert not np.array_equal(batch_indices(100, 20, 0, 0), batch_indices(100, 20, 1, 0))
    assert not np.array_equal(batch_indices(100, 20, 0, 0), batch_indices(100, 20, 0, 5))  # next epoch reshuffles


# --------------------------------------------------------------------------- every variant trains


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_step_keeps_decoder_rows_unit_norm(name, store):
    cfg = cfg_for(name)
    state = train.start(cfg, name, 0, store)
    train.train_step(state, store, cfg, 0, train.autocast_dtype(cfg.train), want_metrics=True)
    W = state.sae.W_dec_KD.detach()
    torch.testing.assert_close(W.norm(dim=-1), torch.ones(state.sae.k))
    assert not torch.equal(W.T, state.sae.W_enc_DK.detach())  # it did move


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_few_hundred_steps_lower_the_loss(name, store, tmp_path):
    cfg = cfg_for(name, steps=200, checkpoint_every=1000, log_every=50)
    out = train_run(cfg, name, 0, 0, store, progress=False, out=tmp_path / name)
    lines = checkpoint.read_metrics(out)
    first, last = lines[0], lines[-1]
    assert last["losses/total"] < 0.7 * first["losses/total"]
    assert last["metrics/mse"] < 0.5 * first["metrics/mse"]
    assert last["metrics/explained_variance"] > 0.5


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_same_seed_gives_bit_identical_weights(name, store, tmp_path):
    cfg = cfg_for(name, steps=12)
    a = train_run(cfg, name, 0, 0, store, progress=False, out=tmp_path / "a")
    b = train_run(cfg, name, 0, 0, store, progress=False, out=tmp_path / "b")
    assert_same_weights(a, b)
    # The file too, byte for byte: the evaluation's eval_key hashes it (safetensors' metadata has no fixed order).
    assert (a / checkpoint.WEIGHTS).read_bytes() == (b / checkpoint.WEIGHTS).read_bytes()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_resume_after_a_kill_equals_an_uninterrupted_run(name, store, tmp_path, monkeypatch):
    # Planted dead features are resampled at step 13: between the checkpoint (10) and the kill (17).
    cfg = cfg_for(name, steps=30, resample_after=0.4)
    real_start = train.start

    def start_with_dead_features(*args):
        state = real_start(*args)
        with torch.no_grad():
            state.sae.b_enc_K[::8] = -1e4
        return state

    monkeypatch.setattr(train, "start", start_with_dead_features)
    whole = train_run(cfg, name, 0, 0, store, progress=False, out=tmp_path / "whole")
    assert checkpoint.read_info(whole)["resampled_fraction"] >= 1 / 16  # at least the planted global ones
    real_step = train.train_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 17:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, name, 0, 0, store, progress=False, out=tmp_path / "killed")
    assert checkpoint.read_info(tmp_path / "killed")["step"] == 10
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = train_run(cfg, name, 0, 0, store, progress=False, out=tmp_path / "killed")
    assert_same_weights(whole, resumed)
    strip = lambda lines: [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in lines]  # noqa: E731
    assert strip(checkpoint.read_metrics(whole)) == strip(checkpoint.read_metrics(resumed))
    assert checkpoint.read_info(resumed)["resampled_fraction"] == checkpoint.read_info(whole)["resampled_fraction"]


# --------------------------------------------------------------------------- the run folder


def test_checkpoint_round_trip(store, tmp_path):
    cfg = cfg_for("hierarchical", steps=10)
    out = train_run(cfg, "hierarchical", 3, 1, store, progress=False, out=tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "weights.safetensors"]
    info = json.loads((out / "config.json").read_text())
    assert info["variant"] == "hierarchical" and info["layer"] == 3 and info["seed"] == 1 and info["done"]
    assert info["normalisation"]["scale"] == pytest.approx(store.scale)
    assert info["config"]["sae"]["options"]["gate_init"] == 0.0 and "git_commit" in info
    assert info["groups"] == {"global": [0, 32], "position": [32, 64]}
    sae = checkpoint.load_sae(out)
    assert type(sae).name == "hierarchical"
    x_BD = store.normalised(np.arange(40))
    pos_B = torch.from_numpy(store.pos_N[:40].astype(np.int64))
    again = checkpoint.load_sae(out)
    torch.testing.assert_close(sae(x_BD, pos_B).x_hat, again(x_BD, pos_B).x_hat)
    mean_D, scale = checkpoint.load_normalisation(out)
    np.testing.assert_allclose(mean_D.numpy(), store.mean_D, rtol=0, atol=0)
    assert scale == pytest.approx(store.scale)


def test_config_json_records_the_other_files_and_the_weights_bytes_are_the_sae_alone(store, tmp_path):
    out = train_run(cfg_for("baseline", steps=10), "baseline", 0, 0, store, progress=False, out=tmp_path / "r")
    info = checkpoint.read_info(out)
    assert sorted(info["files"]) == ["metrics.jsonl", "weights.safetensors"]  # no train_state once finished
    for name, recorded in info["files"].items():
        assert recorded == file_record(out / name)
    again = train_run(cfg_for("baseline", steps=10), "baseline", 0, 0, store, progress=False, out=tmp_path / "r2")
    assert (again / checkpoint.WEIGHTS).read_bytes() == (out / checkpoint.WEIGHTS).read_bytes()


@pytest.mark.parametrize("damage", ["truncate", "edit-weights", "edit-metrics", "delete-weights"])
def test_a_damaged_finished_run_is_trained_again_not_reported_done(store, tmp_path, capfd, damage):
    cfg = cfg_for("baseline", steps=10)
    out = train_run(cfg, "baseline", 0, 0, store, progress=False, out=tmp_path / "r")
    good = (out / checkpoint.WEIGHTS).read_bytes()
    weights, metrics = out / checkpoint.WEIGHTS, out / checkpoint.METRICS
    if damage == "truncate":
        weights.write_bytes(good[:1000])
    elif damage == "edit-weights":
        weights.write_bytes(good[:-4] + bytes(b ^ 1 for b in good[-4:]))
    elif damage == "edit-metrics":
        metrics.write_text(metrics.read_text().replace('"step": 5', '"step": 6'))
    else:
        weights.unlink()
    if damage != "edit-metrics":
        with pytest.raises(checkpoint.CorruptRun) as err:  # named, not a bare SafetensorError or FileNotFoundError
            checkpoint.load_sae(out)
        assert str(err.value).startswith(str(weights)) and "Fix: train the run again" in str(err.value)
    capfd.readouterr()
    assert not train.is_finished(out, checkpoint.read_info(out)["run_hash"])
    train_run(cfg, "baseline", 0, 0, store, progress=False, out=out)
    said = capfd.readouterr().err
    assert said.startswith("posae: training a run again: ") and said.count("\n") == 1, said
    assert weights.read_bytes() == good  # trained again from the start, to the same bits


def test_a_run_folder_is_its_path_identity(store, tmp_path):
    out = train_run(cfg_for("baseline", steps=10), "baseline", 0, 0, store, progress=False,
                    out=tmp_path / "saes" / "baseline" / "layer_0" / "seed_0")
    assert checkpoint.path_identity(out) == {"variant": "baseline", "layer": 0, "seed": 0}
    assert checkpoint.path_identity(tmp_path / "r") is None  # a folder elsewhere is not checked
    info_path = out / checkpoint.INFO
    info_path.write_text(info_path.read_text().replace('\n  "layer": 0,\n', '\n  "layer": 3,\n'))
    with pytest.raises(checkpoint.CorruptRun) as err:
        checkpoint.read_info(out)
    assert str(err.value).startswith(f"{info_path}: says layer 3, but the folder is the run of layer 0 ")
    assert "Fix: " in str(err.value)


def test_a_run_from_before_digests_still_loads(store, tmp_path):
    out = train_run(cfg_for("baseline", steps=10), "baseline", 0, 0, store, progress=False, out=tmp_path / "r")
    info = json.loads((out / checkpoint.INFO).read_text())
    del info["files"]
    (out / checkpoint.INFO).write_text(json.dumps(info))
    assert checkpoint.check_run(out) == info and train.is_finished(out, info["run_hash"])
    checkpoint.load_sae(out)


def test_metrics_have_namespaced_keys(store, tmp_path):
    out = train_run(cfg_for("contrastive", steps=10), "contrastive", 0, 0, store, progress=False, out=tmp_path / "r")
    lines = checkpoint.read_metrics(out)
    assert [m["step"] for m in lines] == [1, 5, 10]
    want = {"losses/total", "losses/recon", "losses/l1", "losses/contrastive", "metrics/mse", "metrics/l0",
            "metrics/l1", "metrics/explained_variance", "metrics/dead_fraction", "metrics/resampled_fraction",
            "metrics/gate_mean", "perf/tokens_per_s"}
    assert want <= set(lines[-1])


def test_the_final_record_holds_the_step_budget_and_each_tables_movement(store, tmp_path):
    cfg = cfg_for("multiscale", steps=10)
    out = train_run(cfg, "multiscale", 0, 0, store, progress=False, out=tmp_path / "r")
    lines = checkpoint.read_metrics(out)
    assert not any(k.startswith(("budget/", "tables/")) for line in lines[:-1] for k in line)
    last = lines[-1]
    assert last["budget/lr_sum"] == pytest.approx(train.lr_budget(cfg.train)) == pytest.approx(10 * 1e-2)
    sae, initial = checkpoint.load_sae(out), build("multiscale", D, cfg.sae, L, seed=0)
    names = ["pos_embed_s1", "pos_embed_s4", "pos_embed_s16", "gate_logits"]
    assert sorted(sae.position_tables()) == sorted(names)
    for name in names:
        now, start = sae.position_tables()[name].detach(), initial.position_tables()[name].detach()
        change = (now - start).abs()
        assert last[f"tables/{name}/mean"] == pytest.approx(float(now.mean()))
        assert last[f"tables/{name}/std"] == pytest.approx(float(now.std()))
        assert last[f"tables/{name}/max_abs_change"] == pytest.approx(float(change.max()))
        assert last[f"tables/{name}/mean_abs_change"] == pytest.approx(float(change.mean()))
        assert 0 < last[f"tables/{name}/max_abs_change"]
    baseline = train_run(cfg_for("baseline", steps=10), "baseline", 0, 0, store, progress=False, out=tmp_path / "b")
    assert not any(k.startswith("tables/") for k in checkpoint.read_metrics(baseline)[-1])  # no table, no key


def test_table_movement_finds_a_planted_move_and_no_other():
    sae = build("soft_masking", D, SAE_CFG, L, seed=0)
    initial = build("soft_masking", D, SAE_CFG, L, seed=0)
    assert train.table_movement(sae, initial)["tables/mask_logits/max_abs_change"] == 0.0  # nothing moved
    with torch.no_grad():
        sae.mask_logits_TP[3, 5] += 0.25
        sae.W_enc_DK += 1.0  # not a per-position table: not reported
    moved = train.table_movement(sae, initial)
    assert set(moved) == {f"tables/mask_logits/{k}" for k in ("mean", "std", "max_abs_change", "mean_abs_change")}
    assert moved["tables/mask_logits/max_abs_change"] == pytest.approx(0.25)
    assert moved["tables/mask_logits/mean_abs_change"] == pytest.approx(0.25 / sae.mask_logits_TP.numel())
    assert moved["tables/mask_logits/mean"] == pytest.approx(0.25 / sae.mask_logits_TP.numel())


def test_finished_run_is_skipped_and_a_changed_config_retrains(store, tmp_path):
    cfg = cfg_for("baseline", steps=10)
    out = train_run(cfg, "baseline", 0, 0, store, progress=False, out=tmp_path / "r")
    stamp = (out / "weights.safetensors").stat().st_mtime_ns
    train_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=2)), "baseline", 0, 0, store,
              progress=False, out=out)
    assert (out / "weights.safetensors").stat().st_mtime_ns == stamp  # bookkeeping changes keep the run
    train_run(cfg_for("baseline", steps=12), "baseline", 0, 0, store, progress=False, out=out)
    assert checkpoint.read_info(out)["step"] == 12


def test_resampling_revives_planted_dead_features(store):
    cfg = cfg_for("baseline", steps=40, resample_after=0.1)  # threshold: 4 inactive steps
    state = train.start(cfg, "baseline", 0, store)
    dead = torch.arange(0, 64, 4)
    with torch.no_grad():
        state.sae.b_enc_K[dead] = -1e4  # these can never fire
    dtype = train.autocast_dtype(cfg.train)
    revived = 0
    for _ in range(train.resample_threshold(cfg.train) + 1):
        stats = train.train_step(state, store, cfg, 0, dtype, want_metrics=False)
        revived += train.maybe_resample(state, stats, cfg.train, 0)
    assert revived >= len(dead) and bool(state.resampled_K[dead].all())
    assert (state.sae.b_enc_K.detach()[dead] == 0).all()
    for name, axis, features in state.sae.feature_params():
        moments = state.opt.state[state.sae.get_parameter(name)]["exp_avg"]
        assert (moments.index_select(axis, dead - features.start) == 0).all()
    x_BD = store.normalised(np.arange(len(store)))
    pos_B = torch.from_numpy(store.pos_N.astype(np.int64))
    fired_K = (state.sae.encode(x_BD, pos_B) > 0).any(0)
    assert fired_K[dead].float().mean() > 0.5


# --------------------------------------------------------------------------- the entry point


def test_train_variant_trains_every_layer_and_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("POSAE_RUNS", str(tmp_path))
    cfg = Config(name="tiny", sae=SAE_CFG, train=dataclasses.replace(TRAIN_CFG, steps=6, seeds=(0, 1)))
    cfg = dataclasses.replace(cfg, capture=dataclasses.replace(cfg.capture, layers=(1, 2)))
    for layer in (1, 2):
        make_store(activations_dir("tiny", layer, "train"), seed=layer)
    folders = train.train_variant(cfg, "soft_masking", progress=False)
    assert [(checkpoint.read_info(f)["layer"], checkpoint.read_info(f)["seed"]) for f in folders] == [
        (1, 0), (1, 1), (2, 0), (2, 1)]
    df = checkpoint.metrics_frame("tiny")
    assert set(df.columns) == {"variant", "layer", "seed", "step", "tokens", "metric", "value"}
    assert set(df.metric) >= {"losses/total", "metrics/l0"} and set(df.variant) == {"soft_masking"}
    runs = checkpoint.runs_frame("tiny")
    assert len(runs) == 4 and {"mse", "l0", "mask_mean_start", "mask_mean_end", "loss_total"} <= set(runs.columns)
    with pytest.raises(ConfigError, match="baseline"):
        train.train_variant(cfg, "nonesuch", progress=False)
    with pytest.raises(ConfigError, match="layer 7"):
        train.train_variant(cfg, "baseline", layers=[7], progress=False)
