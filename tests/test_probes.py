"""Probe primitives: buckets, the split by sequence, stratified subsampling, the unlearning score."""

import numpy as np
import pytest

from posae.probes import fit_probe, position_bucket, split_by_sequence, stratified_subsample, unlearning_score


def test_bucket_is_floor_of_t_times_buckets_over_L():
    assert position_bucket(np.array([0, 15, 16, 127]), 128, 8).tolist() == [0, 0, 1, 7]
    with pytest.raises(ValueError):
        position_bucket(np.array([128]), 128, 8)


def test_split_never_puts_one_sequence_on_both_sides():
    seq = np.repeat(np.arange(50), 10)
    split = split_by_sequence(seq, 0.2, seed=3)
    assert not set(seq[split.train_idx]) & set(seq[split.test_idx])
    assert len(set(seq[split.test_idx])) == 10
    again = split_by_sequence(seq, 0.2, seed=3)
    assert (again.test_idx == split.test_idx).all()


def test_stratified_subsample_takes_positions_evenly():
    pos = np.tile(np.arange(1, 17), 100)
    idx = stratified_subsample(np.arange(len(pos)), pos, 320, seed=0)
    assert len(idx) == 320 and (np.bincount(pos[idx])[1:] == 20).all()


def test_unlearning_score_on_hand_computed_accuracies():
    assert unlearning_score(1.0, 0.125, 8) == pytest.approx(1.0)
    assert unlearning_score(0.5625, 0.125, 8) == pytest.approx(0.5)  # (0.5625-0.125)/(1-1/8)
    assert unlearning_score(0.3, 0.6, 8) == 0.0  # clipped


def test_probe_reads_a_planted_position_signal_and_not_noise():
    rng = np.random.default_rng(0)
    pos = np.tile(np.arange(32), 60)
    y = position_bucket(pos, 32, 8)
    signal = np.c_[np.eye(8)[y] * 3, rng.normal(size=(len(pos), 4))] + rng.normal(size=(len(pos), 12)) * 0.5
    noise = rng.normal(size=(len(pos), 12))
    tr, te = np.arange(0, 1500), np.arange(1500, len(pos))
    assert fit_probe(signal[tr], y[tr], signal[te], y[te]) > 0.9
    assert fit_probe(noise[tr], y[tr], noise[te], y[te]) < 0.25
