"""multiscale: the hierarchical model with position embeddings at several temporal scales (paper §6.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posae.config import doc_field
from posae.saes import register
from posae.saes.hierarchical import Hierarchical, HierarchicalOptions


@dataclass(frozen=True)
class MultiScaleOptions(HierarchicalOptions):
    scales: tuple[int, ...] = doc_field((1, 4, 16), "position granularities: p_t = Σ_s E_s[⌊t/s⌋] (docs/decisions.md §9)")


@register("multiscale")
class MultiScale(Hierarchical):
    """The hierarchical model with p_t = E_1[t] + E_4[⌊t/4⌋] + E_16[⌊t/16⌋] (docs/decisions.md §9), summed.

    Each scale has its own learned table of ⌈T/s⌉ rows; the sum is a [T, D] table built once per
    step, so the per-token cost equals the hierarchical model's.
    """

    Options = MultiScaleOptions

    def init_position_embedding(self, g: torch.Generator) -> None:
        scales = self.options.scales
        if not scales or any(s < 1 for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"multiscale: scales {scales} must be distinct positive integers. Fix: e.g. [1, 4, 16]")
        std = self.options.position_init_std / len(scales) ** 0.5  # the sum starts as large as one table
        self.pos_embed = nn.ParameterDict({
            f"s{s}": nn.Parameter(torch.randn(-(-self.seq_len // s), self.d_model, generator=g) * std)
            for s in scales
        })

    def position_table(self) -> Tensor:
        t_T = torch.arange(self.seq_len, device=self.W_enc_DK.device)
        return sum(self.pos_embed[f"s{s}"][t_T // s] for s in self.options.scales)

    def position_tables(self) -> dict[str, Tensor]:
        # Each scale's own table: the bound Σ lr_t holds per parameter, not for their sum p_t.
        scales = {f"pos_embed_s{s}": self.pos_embed[f"s{s}"] for s in self.options.scales}
        return {**scales, **super().position_tables()}
