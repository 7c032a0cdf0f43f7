"""attention_routing: global features plus attention-routed position features, no gate (paper §4.2,
"pure attention routing: led to position information loss")."""

from __future__ import annotations

from posae.saes import register
from posae.saes.hierarchical import Hierarchical


@register("attention_routing")
class AttentionRouting(Hierarchical):
    """f = [f_g ; ReLU(f_p + α_t)]: the hierarchical model without its gate g_t.

    Reading: "pure" routing means the attention alone decides how position features mix, with no
    learned per-position gate on top; f_p keeps its position embedding (eq. 3), and α_t is the
    hierarchical model's, its queries (x − b_d + p_t) W_q depending on the token and its position.
    The loss is unweighted (w_t = 1): the weights belong to the full model of eq. 7.
    """

    use_gate = False
