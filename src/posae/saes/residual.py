"""residual: position features with a direct residual path to the reconstruction (paper §4.2,
"direct residual connections: caused feature collapse")."""

from __future__ import annotations

from torch import Tensor

from posae.saes import register
from posae.saes.hierarchical import Hierarchical


@register("residual")
class Residual(Hierarchical):
    """f = [f_g ; f_p] with both halves ReLU(W (x − b_d) + b), x̂ = W_d f + b_d + r_t: a learned
    per-position vector r_t reaches the reconstruction directly, bypassing the dictionary.

    Reading (docs/decisions.md, "Variants as the design reads"): r_t is a learned table of T
    vectors in R^D (the parameter ``pos_embed_TD``, initialised like the hierarchical model's p_t),
    added to x̂. The position features do not also receive it in their input: they see x − b_d, so
    the position component is carried once, by r_t, and the position group differs from the global
    one only by its name. The path can absorb each position's mean offset with no feature firing,
    which is how such a path lets position features collapse. No attention, no gate, w_t = 1.
    """

    use_attention = False
    use_gate = False
    position_residual = True

    def decode(self, f_BK: Tensor, pos_B: Tensor) -> Tensor:
        x_hat_BD = super().decode(f_BK, pos_B)
        return x_hat_BD + self.position_table().to(x_hat_BD.dtype).index_select(0, pos_B)
