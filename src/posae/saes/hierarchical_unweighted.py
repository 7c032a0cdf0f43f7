"""hierarchical_unweighted: the full model trained without eq. 7's loss weights (the ablation of paper §6.3)."""

from __future__ import annotations

from posae.saes import register
from posae.saes.hierarchical import Hierarchical


@register("hierarchical_unweighted")
class HierarchicalUnweighted(Hierarchical):
    """The hierarchical model's architecture; only the objective differs: w_t = 1 for every token.

    The paper's position-weighting ablation is on its full model, weights on against off
    (docs/decisions.md, "Variants as the design reads"). params/variants/hierarchical_unweighted.yaml
    sets ``train.position_weighted: false`` and the hierarchical model's options; trained with the
    same seeds, the two are the paired comparison (baseline against position_weighted is a second pair).
    """
