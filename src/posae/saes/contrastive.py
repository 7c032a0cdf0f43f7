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


class _UnitRows(torch.autograd.Function):
    """z / max(‖z‖, ε) per row, F.normalize's numbers, with a hand-written backward.

    (g − u (u · g)) / ‖z‖ is three passes over [B, P]; autograd's division and norm take about ten.
    Where the norm was clamped to ε the division is by a constant, as in F.normalize.
    """

    @staticmethod
    def forward(ctx, z_BP: Tensor) -> Tensor:
        norm_B1 = torch.linalg.vector_norm(z_BP, dim=-1, keepdim=True)
        clamped_B1 = norm_B1 < _EPS
        norm_B1 = norm_B1.clamp_min_(_EPS)
        u_BP = z_BP / norm_B1
        ctx.save_for_backward(u_BP, norm_B1, clamped_B1)
        return u_BP

    @staticmethod
    def backward(ctx, g_BP: Tensor) -> Tensor:
        u_BP, norm_B1, clamped_B1 = ctx.saved_tensors
        dot_B1 = torch.linalg.vecdot(u_BP, g_BP).unsqueeze(-1).masked_fill_(clamped_B1, 0.0)
        return torch.addcmul(g_BP, u_BP, dot_B1, value=-1).div_(norm_B1)


_EPS = 1e-12  # F.normalize's


def position_info_nce(z_BP: Tensor, pos_B: Tensor, n_positions: int, temperature: float,
                      anchors: int = 0) -> Tensor:
    """InfoNCE of tokens' position features against per-position prototypes.

    A token's logit for position t is its mean cosine similarity to the batch's other tokens at t,
    over τ; the positive is its own position (the same position in other sequences: a sequence
    holds each position once, so leaving the token itself out leaves only other sequences).
    Prototypes are built from every token; `anchors` > 0 scores an evenly strided subset of
    them, which keeps the term at O(anchors·T·P) instead of O(B²·P) for all pairs (docs/decisions.md §9: a
    step within 2x the baseline's). Anchors whose position has no other token are skipped.

    Leaving the anchor out touches one logit per row, so it is written into that entry alone
    (no one-hot [B, T] arithmetic), and skipped anchors are weighted 0 rather than indexed out.
    """
    z_BP = _UnitRows.apply(z_BP.float())
    B, T = z_BP.shape[0], n_positions
    sum_TP = z_BP.new_zeros(T, z_BP.shape[1]).index_add(0, pos_B, z_BP)
    count_T = torch.bincount(pos_B, minlength=T).to(z_BP.dtype)
    if 0 < anchors < B:
        pick = torch.arange(0, B, B // anchors, device=z_BP.device)[:anchors]
        z_BP, pos_B = z_BP[pick], pos_B[pick]
    sim_BT = (z_BP @ sum_TP.T).float()
    # The anchor's similarity to itself (1, or 0 for an all-zero row) carries no gradient: ‖u‖² is constant.
    self_B = torch.linalg.vecdot(z_BP, z_BP).detach()
    others_B = count_T[pos_B] - 1
    own_B = (sim_BT.gather(1, pos_B[:, None]).squeeze(1) - self_B) / others_B.clamp_min(1)
    absent_T = torch.zeros_like(count_T).masked_fill_(count_T == 0, float("-inf"))  # no token at t in the batch
    logits_BT = torch.addcmul(absent_T, sim_BT, 1.0 / (count_T.clamp_min(1) * temperature))
    logits_BT = logits_BT.scatter(1, pos_B[:, None], (own_B / temperature)[:, None])
    valid_B = (others_B > 0).to(z_BP.dtype)
    loss_B = F.cross_entropy(logits_BT, pos_B, reduction="none")
    return (loss_B * valid_B).sum() / valid_B.sum().clamp_min(1)


@register("contrastive")
class Contrastive(Hierarchical):
    """The hierarchical model; its forward adds λ2 · InfoNCE over the position features (docs/decisions.md §9).

    Positives are tokens at the same position in other sequences of the batch, negatives the other
    positions, through per-position prototypes built from the whole batch and scored for a strided
    subset of anchor tokens (see `position_info_nce`). The features compared are the gated
    position features g_t ⊙ ReLU(f_p + α_t) the decoder sees, as a tensor of their own so that their
    gradient is not scattered into a zero [B, K] tensor.
    """

    Options = ContrastiveOptions

    def forward(self, x_BD: Tensor, pos_B: Tensor) -> ForwardOutput:
        f_BK, f_p_BP = self.encode_with_position(x_BD, pos_B)
        nce = position_info_nce(f_p_BP, pos_B, self.seq_len, self.options.temperature, self.options.anchors)
        x_hat_BD, totals_K = self.reconstruct(f_BK, pos_B)
        return ForwardOutput(x_hat_BD, f_BK, {"contrastive": self.options.weight * nce}, totals_K)
