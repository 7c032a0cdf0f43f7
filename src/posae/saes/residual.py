"""residual: position features with a direct residual path to the reconstruction (paper §4.2,
"direct residual connections: caused feature collapse")."""

from __future__ import annotations

from posae.saes import register
from posae.saes.hierarchical import Hierarchical


@register("residual")
class Residual(Hierarchical):
    """f = [f_g ; f_p] (eqs. 2–3), x̂ = W_d f + b_d + p_t: the position embedding also reaches the
    reconstruction directly, bypassing the dictionary.

    Reading: the residual path is the cheapest one that type-checks, the same learned p_t ∈ R^D that
    enters eq. 3 added to x̂. It can absorb each position's mean offset with no feature firing,
    which is how such a path lets position features collapse. No attention, no gate, w_t = 1.
    """

    use_attention = False
    use_gate = False
    position_residual = True
