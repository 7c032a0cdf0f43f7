"""The activation store: round trip, normalisation, 16-bit storage, atomicity, corruption, staleness, digests."""

import json

import numpy as np
import pytest

from posae.data.store import ActivationStore, StoreError, StoreWriter, file_record, is_complete, write_store


def synthetic(n=600, d=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32) * 2 + rng.normal(size=d).astype(np.float32) * 10
    seq = np.arange(n) // 20
    return x, rng.integers(0, 500, n), np.arange(n) % 20 + 1, seq


def test_round_trip_keeps_values_ids_positions_and_sequences(tmp_path):
    x, tok, pos, seq = synthetic()
    store = write_store(tmp_path / "s", x, tok, pos, seq, {"hash": "abc", "layer": 3, "split": "train"})
    assert len(store) == 600 and store.d_model == 12 and store.meta["storage_dtype"] == "float16"
    np.testing.assert_allclose(store.raw(np.arange(600)).numpy(), x, rtol=1e-3, atol=1e-2)
    assert (store.tokens_N == tok).all() and (store.pos_N == pos).all() and (store.seq_N == seq).all()
    assert store.acts_ND.dtype.itemsize == 2  # 16 bits on disk


def test_normalisation_centres_and_scales_mean_squared_norm_to_d(tmp_path):
    x, tok, pos, seq = synthetic()
    store = write_store(tmp_path / "s", x, tok, pos, seq, {"hash": "h"})
    z = store.normalised(np.arange(len(store))).numpy()
    assert np.abs(z.mean(0)).max() < 1e-2
    assert (z ** 2).sum(1).mean() == pytest.approx(12, rel=1e-2)


def test_validation_split_reuses_the_training_statistics(tmp_path):
    x, tok, pos, seq = synthetic()
    train = write_store(tmp_path / "train", x, tok, pos, seq, {"hash": "h"})
    val = write_store(tmp_path / "val", x[:100] + 1, tok[:100], pos[:100], seq[:100], {"hash": "h"}, stats_from=train)
    assert val.scale == train.scale and (val.mean_D == train.mean_D).all()


def test_values_beyond_float16_are_kept_as_bfloat16(tmp_path):
    x, tok, pos, seq = synthetic()
    x[450, 2] = 1e6  # beyond float16's 65504, after rows were already written as float16
    store = write_store(tmp_path / "s", x, tok, pos, seq, {"hash": "h"}, chunk=100)
    assert store.meta["storage_dtype"] == "bfloat16"
    assert store.meta["files"]["acts.npy"] == file_record(tmp_path / "s" / "acts.npy")  # of the rewritten file
    back = store.raw(np.arange(len(store))).numpy()
    np.testing.assert_allclose(back, x, rtol=1e-2, atol=5e-2)


def test_a_writer_that_fails_midway_leaves_no_store(tmp_path):
    x, tok, pos, seq = synthetic()
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(tmp_path / "s", len(x), x.shape[1], {"hash": "h"}) as w:
            w.append(x[:100], tok[:100], pos[:100], seq[:100])
            raise RuntimeError("boom")
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []


def test_short_write_is_refused_and_leaves_no_store(tmp_path):
    x, tok, pos, seq = synthetic()
    with pytest.raises(StoreError, match="100 tokens written, 600 announced"):
        with StoreWriter(tmp_path / "s", len(x), x.shape[1], {"hash": "h"}) as w:
            w.append(x[:100], tok[:100], pos[:100], seq[:100])
    assert not is_complete(tmp_path / "s")


def test_rewriting_replaces_the_old_store_whole(tmp_path):
    x, tok, pos, seq = synthetic()
    write_store(tmp_path / "s", x, tok, pos, seq, {"hash": "old"})
    store = write_store(tmp_path / "s", x[:50], tok[:50], pos[:50], seq[:50], {"hash": "new"})
    assert len(store) == 50 and store.meta["hash"] == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_truncated_array_is_reported_with_its_file_and_the_fix(tmp_path):
    x, tok, pos, seq = synthetic()
    write_store(tmp_path / "s", x, tok, pos, seq, {"hash": "h"})
    acts = tmp_path / "s" / "acts.npy"
    acts.write_bytes(acts.read_bytes()[:1000])
    with pytest.raises(StoreError, match=r"acts.npy.*Fix: delete the folder and capture again"):
        ActivationStore.open(tmp_path / "s")


def test_stale_store_is_reported(tmp_path):
    x, tok, pos, seq = synthetic()
    write_store(tmp_path / "s", x, tok, pos, seq, {"hash": "h1"})
    with pytest.raises(StoreError, match="stale store"):
        ActivationStore.open(tmp_path / "s", expect_hash="h2")


def test_missing_store_says_how_to_make_it(tmp_path):
    with pytest.raises(StoreError, match="01_capture_activations"):
        ActivationStore.open(tmp_path / "nothing")


def test_non_finite_activations_are_refused(tmp_path):
    x, tok, pos, seq = synthetic()
    x[5, 5] = np.nan
    with pytest.raises(StoreError, match="non-finite"):
        write_store(tmp_path / "s", x, tok, pos, seq, {"hash": "h"})


def test_meta_records_each_file_and_verify_finds_changed_data(tmp_path):
    x, tok, pos, seq = synthetic()
    store = write_store(tmp_path / "s", x, tok, pos, seq, {"hash": "h"})
    files = store.meta["files"]
    assert sorted(files) == ["acts.npy", "mean.npy", "pos.npy", "seq.npy", "tokens.npy"]
    for name, recorded in files.items():  # recorded while writing, without reading back: must equal the file's
        assert recorded == file_record(tmp_path / "s" / name), name
    assert is_complete(tmp_path / "s", "h") and store.verify() is store
    acts = tmp_path / "s" / "acts.npy"
    data = bytearray(acts.read_bytes())
    data[-3] ^= 1  # one value changed, the size kept: opening (sizes only) cannot tell
    acts.write_bytes(bytes(data))
    store = ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreError) as err:
        store.verify()
    assert str(err.value).startswith(f"{acts}: content changed (its digest differs from the one recorded")
    assert "Fix: run notebooks/01_capture_activations.ipynb" in str(err.value)
    assert not is_complete(tmp_path / "s", "h")


def test_a_corrupt_meta_json_is_named_with_the_fix(tmp_path):
    x, tok, pos, seq = synthetic()
    write_store(tmp_path / "s", x, tok, pos, seq, {"hash": "h"})
    meta = tmp_path / "s" / "meta.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(StoreError) as err:
        ActivationStore.open(tmp_path / "s")
    assert str(err.value).startswith(f"{meta}: not valid JSON (") and "Fix: run notebooks/01_capture" in str(err.value)
    assert not is_complete(tmp_path / "s")


def test_a_store_from_before_digests_opens_unverified(tmp_path):
    x, tok, pos, seq = synthetic()
    write_store(tmp_path / "s", x, tok, pos, seq, {"hash": "h"})
    meta_path = tmp_path / "s" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    assert is_complete(tmp_path / "s", "h")
    assert len(ActivationStore.open(tmp_path / "s").verify()) == len(x)
