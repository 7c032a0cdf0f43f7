"""Activation capture on the smoke model: hooks equal hidden_states, early exit, store contents, reuse, kill."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from posae.checks import load_config
from posae.config import ConfigError
from posae.data import capture as cap
from posae.data import corpus, models
from posae.data.store import ActivationStore, is_complete


@pytest.fixture(scope="module")
def smoke():
    return load_config("smoke")


@pytest.fixture(scope="module")
def loaded(smoke):
    return models.load_model(smoke.model)


def tiny(smoke, name, **corpus_changes):
    """The smoke config cut down further, under its own run name."""
    c = dataclasses.replace(smoke.corpus, **{"n_train": 8, "n_val": 4, "seq_len": 16, "max_docs": 4, **corpus_changes})
    return dataclasses.replace(smoke, name=name, corpus=c)


def count_calls(modules):
    counts = [0] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        handles.append(m.register_forward_hook(lambda mod, a, o, i=i: counts.__setitem__(i, counts[i] + 1)))
    return counts, handles


def test_decoder_layers_are_found_by_shape(loaded):
    assert cap.decoder_layers(loaded.model) is loaded.model.model.layers

    class TwoStacks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = loaded.model.config
            self.a = torch.nn.ModuleList([torch.nn.Identity()] * 4)
            self.b = torch.nn.ModuleList([torch.nn.Identity()] * 4)

    with pytest.raises(RuntimeError, match="expected one nn.ModuleList of 4"):
        cap.decoder_layers(TwoStacks())


def test_hooked_outputs_equal_hidden_states(loaded):
    ids_BL = torch.randint(3, 200, (3, 12))
    with torch.inference_mode():
        hs = loaded.model(input_ids=ids_BL, output_hidden_states=True).hidden_states
        with cap.layer_outputs(loaded.model, [0, 1, 2], stop=False) as acts:
            loaded.model(input_ids=ids_BL)
    for layer in (0, 1, 2):  # not the last block: hidden_states[-1] has the final norm applied
        assert torch.equal(acts[layer], hs[layer + 1])


def test_forward_stops_after_the_deepest_layer(loaded):
    m = loaded.model
    blocks = list(cap.decoder_layers(m))
    hooks_before = [len(b._forward_hooks) for b in blocks]
    counts, handles = count_calls([*blocks, m.model.norm, m.lm_head])
    try:
        with torch.inference_mode(), cap.layer_outputs(m, [0, 1]) as acts:
            cap.run_to(m, torch.randint(3, 200, (2, 8)))
        assert sorted(acts) == [0, 1]
        assert counts == [1, 1, 0, 0, 0, 0]  # blocks 2, 3, the final norm and the unembedding never ran
    finally:
        for h in handles:
            h.remove()
    assert [len(b._forward_hooks) for b in blocks] == hooks_before  # the capture's hooks are gone too


def test_store_holds_tokens_positions_and_sequence_ids(smoke, smoke_capture):
    seqs = corpus.load_sequences(smoke.corpus, models.random_tokenizer())
    L = smoke.corpus.seq_len
    for (layer, split), path in smoke_capture.items():
        store = ActivationStore.open(path)
        s_SL = seqs.train_SL if split == "train" else seqs.val_SL
        S = len(s_SL)
        assert len(store) == S * (L - 1) and store.d_model == 64  # BOS excluded
        assert np.array_equal(store.tokens_N, s_SL[:, 1:].ravel())
        assert np.array_equal(store.pos_N, np.tile(np.arange(1, L), S))
        assert np.array_equal(store.seq_N, np.repeat(np.arange(S), L - 1))
        assert (store.tokens_N != seqs.bos_id).all()
        m = store.meta
        assert (m["layer"], m["split"], m["model"], m["seq_len"], m["exclude_bos"]) == (layer, split, "random", L, True)
        assert m["forward_dtype"] == "float32" and m["n_sequences"] == S and m["bos_norm"] > 0


def test_stored_values_are_the_models_hidden_states(smoke, smoke_capture, loaded):
    seqs = corpus.load_sequences(smoke.corpus, models.random_tokenizer())
    with torch.inference_mode():
        hs = loaded.model(input_ids=torch.from_numpy(seqs.val_SL[:2]).long(), output_hidden_states=True).hidden_states
    L = smoke.corpus.seq_len
    for layer in smoke.capture.layers:
        store = ActivationStore.open(smoke_capture[layer, "val"])
        want = hs[layer + 1][:, 1:].reshape(-1, 64).numpy()
        np.testing.assert_allclose(store.raw(np.arange(2 * (L - 1))).numpy(), want, rtol=2e-3, atol=2e-3)


def test_validation_uses_the_training_statistics(smoke, smoke_capture):
    for layer in smoke.capture.layers:
        train, val = (ActivationStore.open(smoke_capture[layer, s]) for s in ("train", "val"))
        assert val.scale == train.scale and np.array_equal(val.mean_D, train.mean_D)


def test_complete_stores_are_reused_without_loading_the_model(smoke, smoke_capture, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded although every store is complete")

    monkeypatch.setattr(models, "load_model", refuse)
    assert cap.capture(smoke, progress=False) == smoke_capture


def test_only_stale_or_missing_layers_are_recomputed(smoke, monkeypatch):
    cfg = tiny(smoke, "t-reuse")
    first = cap.capture(cfg, progress=False)
    mtime = (first[1, "train"] / "meta.json").stat().st_mtime_ns
    h_old = ActivationStore.open(first[1, "train"]).meta["hash"]
    more = dataclasses.replace(cfg, capture=dataclasses.replace(cfg.capture, layers=(1, 3)))
    second = cap.capture(more, progress=False)
    assert (second[1, "train"] / "meta.json").stat().st_mtime_ns == mtime  # kept
    assert is_complete(second[3, "val"])
    reseeded = dataclasses.replace(more, corpus=dataclasses.replace(more.corpus, seed=5))
    third = cap.capture(reseeded, progress=False)
    assert ActivationStore.open(third[1, "train"]).meta["hash"] != h_old  # new tokens, new store


def test_bos_kept_when_asked_and_blocks_above_never_run(smoke, monkeypatch):
    cfg = tiny(smoke, "t-bos", exclude_bos=False)
    counts = {}
    real_load = models.load_model

    def load_and_count(*a, **k):
        loaded = real_load(*a, **k)
        counts["blocks"], _ = count_calls(list(cap.decoder_layers(loaded.model)))
        return loaded

    monkeypatch.setattr(models, "load_model", load_and_count)
    paths = cap.capture(cfg, progress=False)
    batches = -(-8 // cfg.capture.batch_size) + -(-4 // cfg.capture.batch_size)
    assert counts["blocks"] == [batches, batches, batches, 0]  # deepest configured layer is 2
    store = ActivationStore.open(paths[2, "train"])
    assert len(store) == 8 * 16 and np.array_equal(store.pos_N[:16], np.arange(16))
    assert (store.tokens_N[store.pos_N == 0] == 2).all() and store.meta["exclude_bos"] is False


def test_invalid_config_fails_before_any_heavy_work(smoke, monkeypatch):
    monkeypatch.setattr(models, "load_tokenizer", lambda *a: pytest.fail("tokenizer loaded before validation"))
    bad = dataclasses.replace(smoke, capture=dataclasses.replace(smoke.capture, layers=(1, 9)))
    with pytest.raises(ConfigError, match="capture.layers.*Fix"):
        cap.capture(bad, progress=False)


_KILLED_CHILD = """
import dataclasses, sys, time
from posae.data import store
from posae.data.capture import capture
from posae.checks import load_config

append = store.StoreWriter.append
def append_then_hang(self, *args):
    append(self, *args)
    open(sys.argv[1], "w").close()  # tell the parent we are mid-way
    time.sleep(120)
store.StoreWriter.append = append_then_hang
cfg = load_config("smoke")
capture(dataclasses.replace(cfg, name="killed"), progress=False)
"""


def test_killed_capture_leaves_no_complete_store_and_rerun_completes(tmp_path, smoke, monkeypatch):
    runs, marker = tmp_path / "runs", tmp_path / "midway"
    env = {**os.environ, "POSAE_RUNS": str(runs)}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(marker)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    acts = runs / "killed" / "activations"
    assert list(acts.rglob("*.npy")), "the child wrote nothing before it was killed"
    assert not list(acts.rglob("meta.json"))
    cfg = dataclasses.replace(smoke, name="killed")
    assert not any(is_complete(p) for p in cap.store_paths(cfg).values())

    monkeypatch.setenv("POSAE_RUNS", str(runs))
    paths = cap.capture(cfg, progress=False)
    assert all(is_complete(p) for p in paths.values())
    leftovers = [p for p in acts.rglob(".*") if p.name.endswith(".tmp")]
    assert not leftovers
