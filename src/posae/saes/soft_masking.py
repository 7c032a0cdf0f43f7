"""soft_masking: a learned soft per-position mask on the position-specific features (paper §6.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posae.config import doc_field
from posae.saes import register
from posae.saes.grouped import GroupedSAE


@dataclass(frozen=True)
class SoftMaskingOptions:
    mask_init: float = doc_field(0.0, "initial mask logit: σ(0) = 0.5, like the hierarchical gate (docs/decisions.md §9)")


@register("soft_masking")
class SoftMasking(GroupedSAE):
    """Position features are ReLU(W_p (x − b_dec) + b_p) ⊙ σ(M[t]), with a learned table M ∈ R^{T×P}.

    The paper's λ1 = 0.04 against its main 0.1 is read as a multiplier of the config's λ1 (docs/decisions.md §9):
    params/variants/soft_masking.yaml sets ``train.l1_scale: 0.4``.
    """

    Options = SoftMaskingOptions

    def __init__(self, d_model, sae_cfg, seq_len, options, generator):
        super().__init__(d_model, sae_cfg, seq_len, options, generator)
        self.mask_logits_TP = nn.Parameter(torch.full((seq_len, self.k - self.n_global), self.options.mask_init))

    def encode(self, x_BD: Tensor, pos_B: Tensor) -> Tensor:
        f_BK = self.pre_acts(x_BD, relu=True)
        f_g_BG, f_p_BP = self.split(f_BK)
        return torch.cat([f_g_BG, f_p_BP * self.gates(pos_B, f_p_BP.dtype)], dim=1)

    def gates(self, pos_B: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        # Cast the small [T, P] table, not the [B, P] product; index_select's backward is an
        # index_add, several times faster than fancy indexing's.
        return torch.sigmoid(self.mask_logits_TP).to(dtype).index_select(0, pos_B)

    def diagnostics(self) -> dict[str, float]:
        return {"mask_mean": float(torch.sigmoid(self.mask_logits_TP.detach()).mean())}

    def position_tables(self) -> dict[str, Tensor]:
        return {"mask_logits": self.mask_logits_TP}

    def feature_params(self) -> list[tuple[str, int, range]]:
        return super().feature_params() + [("mask_logits_TP", 1, range(self.n_global, self.k))]
