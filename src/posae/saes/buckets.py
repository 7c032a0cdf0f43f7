"""Position buckets: the probes' labels and position_masking's blocks (docs/decisions.md §9), defined once, here."""

from __future__ import annotations

import numpy as np


def position_bucket(pos_N: np.ndarray, seq_len: int, buckets: int) -> np.ndarray:
    """⌊t·buckets/L⌋ for each position t in [0, L)."""
    pos_N = np.asarray(pos_N, dtype=np.int64)
    if pos_N.size and (pos_N.min() < 0 or pos_N.max() >= seq_len):
        raise ValueError(f"positions must lie in [0, {seq_len}), got {pos_N.min()}..{pos_N.max()}")
    return (pos_N * buckets) // seq_len
