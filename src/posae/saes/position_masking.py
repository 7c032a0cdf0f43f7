"""position_masking: hard binary position masks on the position-specific features (paper §6.1, "unstable")."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from posae.config import SAEConfig
from posae.saes import register
from posae.saes.buckets import position_bucket
from posae.saes.grouped import GroupedSAE


@register("position_masking")
class PositionMasking(GroupedSAE):
    """Global features are a plain ReLU SAE; position features are cut into `buckets` equal blocks and
    only the block of t's bucket may fire at position t.

    Buckets are the probes' own, ⌊t·buckets/L⌋ (docs/decisions.md §9), so this variant is the probes' positive
    control: the position group's activity pattern names the bucket by construction (acc_P ≈ 1).
    Feature j of the position group belongs to block ⌊j·buckets/P⌋.
    """

    def __init__(self, d_model, sae_cfg, seq_len, options, generator):
        super().__init__(d_model, sae_cfg, seq_len, options, generator)
        buckets, P = sae_cfg.buckets, self.k - self.n_global
        bucket_T = torch.from_numpy(position_bucket(np.arange(seq_len), seq_len, buckets))
        bucket_P = torch.arange(P) * buckets // P
        # Derived from the config alone, so not saved with the weights.
        self.register_buffer("mask_TP", (bucket_T[:, None] == bucket_P[None, :]).float(), persistent=False)

    @classmethod
    def size_problem(cls, k: int, d_model: int, sae_cfg: SAEConfig) -> str | None:
        problem = super().size_problem(k, d_model, sae_cfg)
        if problem is None and k // 2 < sae_cfg.buckets:  # each bucket needs a block of at least one feature
            return (f"its {k // 2} position features (half of k = {k}) cannot fill {sae_cfg.buckets} buckets. "
                    "Fix: raise sae.expansion or lower sae.buckets")
        return problem

    def encode(self, x_BD: Tensor, pos_B: Tensor) -> Tensor:
        f_BK = self.pre_acts(x_BD, relu=True)
        f_g_BG, f_p_BP = self.split(f_BK)
        return torch.cat([f_g_BG, f_p_BP * self.gates(pos_B, f_p_BP.dtype)], dim=1)

    def gates(self, pos_B: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.mask_TP.to(dtype).index_select(0, pos_B)
