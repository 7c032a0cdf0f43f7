"""hierarchical: the paper's full model, eqs. 2–7 (§4): global and position features, attention routing, a gate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from posae.config import doc_field
from posae.saes import register
from posae.saes.base import vec_mat
from posae.saes.fused import HierarchicalEncode
from posae.saes.grouped import GroupedSAE


@dataclass(frozen=True)
class HierarchicalOptions:
    position_init_std: float = doc_field(
        0.1, "std of the learned position embedding p_t at initialisation (inputs have unit per-dimension scale)", min=0.0)
    gate_init: float = doc_field(0.0, "initial gate logit: σ(0) = 0.5 (docs/decisions.md §9); σ(−2) ≈ 0.12 is the paper's reported gate")


@register("hierarchical")
class Hierarchical(GroupedSAE):
    """f = [f_g ; g_t ⊙ ReLU(f_p + α_t)], x̂ = W_d f + b_d (eqs. 2–6), trained with w_t = 1 + t/L (eq. 7).

    Readings of the ambiguous parts (docs/decisions.md, "Variants as the design reads"):

    - eq. 2–3: f_g = ReLU(W_g (x − b_d) + b_g), f_p = ReLU(W_p (x − b_d + p_t) + b_p), with
      [W_g; W_p] one [D, K] encoder. W_p p_t is a [T, P] table computed once per step, so the
      position embedding costs no per-token matmul.
    - eq. 4 α_t: multi-head attention whose queries come from the token together with its position,
      (x − b_d + p_t) W_q (H heads of width E), and whose keys and values come from the learned
      position table (p W_k, p W_v, all T positions, no causal mask); scores scaled by 1/√E, the
      heads' outputs projected to the P position features by W_o. So α_t depends on t as well as on
      the token ("position-specific attention weights"); with queries from x alone it would be a
      function of the token only. The paper's √d is read as the head width, as in any multi-head
      attention. (x − b_d + p_t) W_q = x W_q + [(p − b_d) W_q][t]: the [T, H·E] part is computed
      once per step and gathered, so the position costs the queries no second per-token matmul.
    - eq. 4 gate: w_t is read as a learned table, g_t = σ(G[t]) with G ∈ R^{T×P} initialised to
      ``gate_init`` (0: g = 0.5); the loss weight of eq. 7 is the separate fixed 1 + t/L
      (``train.position_weighted``).
    - eq. 5: f_p + α_t can be negative, so ReLU(f_p + α_t) keeps features non-negative.

    The intermediate designs the paper tried on the way are subclasses that switch parts off:
    attention_routing (no gate), residual (no attention, no gate, the position table added to x̂
    instead of to the encoder's input).
    """

    Options = HierarchicalOptions
    use_attention: ClassVar[bool] = True
    use_gate: ClassVar[bool] = True
    # The position table r_t goes to the reconstruction (residual's `decode`) instead of the position features' input.
    position_residual: ClassVar[bool] = False

    def __init__(self, d_model, sae_cfg, seq_len, options, generator):
        super().__init__(d_model, sae_cfg, seq_len, options, generator)
        g = generator
        T, D, P = seq_len, d_model, self.k - self.n_global
        self.init_position_embedding(g)
        if self.use_attention:
            X = sae_cfg.heads * sae_cfg.head_dim

            def uniform(*shape: int, fan_in: int) -> nn.Parameter:
                return nn.Parameter((torch.rand(*shape, generator=g) * 2 - 1) / math.sqrt(fan_in))

            self.W_q_DX = uniform(D, X, fan_in=D)
            self.W_k_DX = uniform(D, X, fan_in=D)
            self.W_v_DX = uniform(D, X, fan_in=D)
            self.W_o_XP = uniform(X, P, fan_in=X)
        if self.use_gate:
            self.gate_logits_TP = nn.Parameter(torch.full((T, P), self.options.gate_init))

    # ------------------------------------------------------------------ position embedding

    def init_position_embedding(self, g: torch.Generator) -> None:
        self.pos_embed_TD = nn.Parameter(
            torch.randn(self.seq_len, self.d_model, generator=g) * self.options.position_init_std)

    def position_table(self) -> Tensor:
        """p_t for every position t: [T, D]."""
        return self.pos_embed_TD

    # ------------------------------------------------------------------ the model

    def encode(self, x_BD: Tensor, pos_B: Tensor) -> Tensor:
        if self.position_residual:
            return self.pre_acts(x_BD, relu=True)  # both halves see x − b_d alone; r_t joins in `decode`
        return self.encode_with_position(x_BD, pos_B, want_position=False)[0]

    def encode_with_position(self, x_BD: Tensor, pos_B: Tensor,
                             want_position: bool = True) -> tuple[Tensor, Tensor | None]:
        """(f [B, K], f_p [B, P] as a tensor of its own, or None without `want_position`).

        `reference_groups`'s numbers through one autograd Function (`posae.saes.fused`), which a training
        step runs in fewer ops. A subclass that overrides `reference_groups`, `route` or `gates` changes
        the model, and the fused Function would not see it: such a subclass runs its own definition.
        """
        if not self.fusable():
            f_g_BG, f_p_BP = self.reference_groups(x_BD, pos_B)
            return torch.cat([f_g_BG, f_p_BP], dim=1), (f_p_BP if want_position else None)
        attention = (self.W_q_DX, self.W_k_DX, self.W_v_DX, self.W_o_XP) if self.use_attention else (None,) * 4
        return HierarchicalEncode.apply(
            x_BD, pos_B, self.n_global, self.cfg.heads, want_position, self.W_enc_DK, self.b_enc_K, self.b_dec_D,
            self.position_table(), *attention, self.gate_logits_TP if self.use_gate else None)

    @classmethod
    def fusable(cls) -> bool:
        """Whether the fused Function computes this class's model: none of the parts it fuses is overridden."""
        return not cls.position_residual and all(getattr(cls, part) is getattr(Hierarchical, part)
                                                 for part in ("reference_groups", "route", "gates"))

    def reference_groups(self, x_BD: Tensor, pos_B: Tensor) -> tuple[Tensor, Tensor]:
        """(f_g [B, G], f_p [B, P]), eqs. 2-6 in plain autograd: the definition `encode` is tested against."""
        W_DK = self.W_enc_DK.to(x_BD.dtype)
        pre_g_BG, pre_p_BP = self.split(self.pre_acts(x_BD, W_DK))
        p_TD = self.position_table()
        if self.position_residual:
            f_p_BP = torch.relu(pre_p_BP)  # they see x − b_d: r_t reaches x̂ once, in `decode`
        else:
            # W_p p_t through the whole encoder, then split: the extra [T, G] columns cost little, and the
            # product reuses the encoder's cast, where a slice of the fp32 weight would be cast again and
            # its gradient scattered into a zero fp32 [D, K] tensor before being added.
            _, Wp_p_TP = self.split(p_TD @ W_DK)
            f_p_BP = torch.relu(pre_p_BP + Wp_p_TP.index_select(0, pos_B))
        if self.use_attention:
            f_p_BP = torch.relu(f_p_BP + self.route(x_BD, pos_B, p_TD))
        if self.use_gate:
            f_p_BP = f_p_BP * self.gates(pos_B, f_p_BP.dtype)
        return torch.relu(pre_g_BG), f_p_BP

    def route(self, x_BD: Tensor, pos_B: Tensor, p_TD: Tensor) -> Tensor:
        """α_t (eq. 4): queries (x − b_d + p_t) W_q attend over the position table; [B, P]."""
        H, E = self.cfg.heads, self.cfg.head_dim
        B, T = x_BD.shape[0], p_TD.shape[0]
        # The queries' position and bias part, ((p − b_d) W_q) / √E, is a [T, X] table gathered per token:
        # no [B, D] pass for x − b_d + p_t, and the 1/√E of the scores rides along (no pass over [H, B, T]).
        scale = E**-0.5
        qpos_TX = (p_TD @ self.W_q_DX - vec_mat(self.b_dec_D, self.W_q_DX)) * scale
        q_BX = torch.addmm(qpos_TX.to(x_BD.dtype).index_select(0, pos_B), x_BD, self.W_q_DX.to(x_BD.dtype),
                           alpha=scale)
        q_HBE = q_BX.view(B, H, E).transpose(0, 1)
        k_HET = (p_TD @ self.W_k_DX).view(T, H, E).permute(1, 2, 0)
        v_HTE = (p_TD @ self.W_v_DX).view(T, H, E).transpose(0, 1)
        # Written out rather than F.scaled_dot_product_attention: with 4096 "queries" and 128 keys
        # its CPU path was 2.5x slower here, forward and backward.
        a_HBT = torch.bmm(q_HBE, k_HET.to(q_HBE.dtype)).softmax(dim=-1)
        out_HBE = torch.bmm(a_HBT, v_HTE.to(a_HBT.dtype))
        return out_HBE.transpose(0, 1).reshape(B, H * E) @ self.W_o_XP

    def gates(self, pos_B: Tensor, dtype: torch.dtype = torch.float32) -> Tensor | None:
        if not self.use_gate:
            return None
        return torch.sigmoid(self.gate_logits_TP).to(dtype).index_select(0, pos_B)

    def diagnostics(self) -> dict[str, float]:
        if not self.use_gate:
            return {}
        return {"gate_mean": float(torch.sigmoid(self.gate_logits_TP.detach()).mean())}

    def position_tables(self) -> dict[str, Tensor]:
        tables = {"pos_embed": self.pos_embed_TD} if hasattr(self, "pos_embed_TD") else {}
        if self.use_gate:
            tables["gate_logits"] = self.gate_logits_TP
        return tables

    def feature_params(self) -> list[tuple[str, int, range]]:
        # W_q, W_k, W_v and p_t are shared by all features; W_o's columns and G's are the position group's.
        position = range(self.n_global, self.k)
        own = [("W_o_XP", 1, position)] if self.use_attention else []
        own += [("gate_logits_TP", 1, position)] if self.use_gate else []
        return super().feature_params() + own
