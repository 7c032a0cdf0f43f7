"""contrastive: the hierarchical model plus an InfoNCE loss that groups position features by position (paper §6.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from posae.config import doc_field
from posae.saes import register
from posae.saes.base import ForwardOutput
from posae.saes.hierarchical import Hierarchical, HierarchicalOptions


@dataclass(frozen=True)
class ContrastiveOptions(HierarchicalOptions):
    temperature: float = doc_field(0.1, "InfoNCE temperature τ on cosine similarities", min=1e-4)
    weight: float = doc_field(0.3, "λ2, the InfoNCE term's weight in the objective (eq. 1)", min=0.0)
    anchors: int = doc_field(1024, "tokens per batch scored against the prototypes (0: every token)", min=0)


def position_info_nce(z_BP: Tensor, pos_B: Tensor, n_positions: int, temperature: float,
                      anchors: int = 0) -> Tensor:
    """InfoNCE of tokens' position features against per-position prototypes.

    A token's logit for position t is its mean cosine similarity to the batch's other tokens at t,
    over τ; the positive is its own position (the same position in other sequences: a sequence
    holds each position once, so leaving the token itself out leaves only other sequences).
    Prototypes are built from every token; `anchors` > 0 scores an evenly strided subset of
    them, which keeps the term at O(anchors·T·P) instead of O(B²·P) for all pairs (docs/decisions.md §9: a
    step within 2x the baseline's). Anchors whose position has no other token are skipped.
    """
    z_BP = F.normalize(z_BP.float(), dim=-1)
    B, T = z_BP.shape[0], n_positions
    sum_TP = z_BP.new_zeros(T, z_BP.shape[1]).index_add(0, pos_B, z_BP)
    count_T = torch.bincount(pos_B, minlength=T).to(z_BP.dtype)
    if 0 < anchors < B:
        pick = torch.arange(0, B, B // anchors, device=z_BP.device)[:anchors]
        z_BP, pos_B = z_BP[pick], pos_B[pick]
    own_BT = F.one_hot(pos_B, T).to(z_BP.dtype)
    # Leave-one-out: remove each anchor's similarity to itself (1, or 0 for an all-zero row).
    sim_BT = z_BP @ sum_TP.T - own_BT * (z_BP * z_BP).sum(-1, keepdim=True)
    count_BT = count_T[None, :] - own_BT
    logits_BT = (sim_BT / count_BT.clamp_min(1)).float() / temperature
    logits_BT = logits_BT.masked_fill(count_BT == 0, float("-inf"))
    has_positive_B = count_BT.gather(1, pos_B[:, None]).squeeze(1) > 0
    if not bool(has_positive_B.any()):
        return z_BP.sum() * 0.0
    return F.cross_entropy(logits_BT[has_positive_B], pos_B[has_positive_B])


@register("contrastive")
class Contrastive(Hierarchical):
    """The hierarchical model; its forward adds λ2 · InfoNCE over the position features (docs/decisions.md §9).

    Positives are tokens at the same position in other sequences of the batch, negatives the other
    positions, through per-position prototypes built from the whole batch and scored for a strided
    subset of anchor tokens (see `position_info_nce`). The features compared are the gated
    position features g_t ⊙ ReLU(f_p + α_t) the decoder sees.
    """

    Options = ContrastiveOptions

    def forward(self, x_BD: Tensor, pos_B: Tensor) -> ForwardOutput:
        out = super().forward(x_BD, pos_B)
        _, f_p_BP = self.split(out.features)
        nce = position_info_nce(f_p_BP, pos_B, self.seq_len, self.options.temperature, self.options.anchors)
        return out._replace(aux_losses={**out.aux_losses, "contrastive": self.options.weight * nce})
