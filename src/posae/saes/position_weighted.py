"""position_weighted: the baseline trained with loss weights w_t = 1 + t/L (eq. 7; ablation of §6.3)."""

from __future__ import annotations

from posae.saes import register
from posae.saes.baseline import Baseline


@register("position_weighted")
class PositionWeighted(Baseline):
    """The baseline's architecture; only the objective differs.

    The weights live in the objective, not the model: params/variants/position_weighted.yaml sets
    ``train.position_weighted: true`` (w_t normalised to mean 1, docs/decisions.md §9), and training with the
    baseline's seeds gives the paired comparison of the ablation.
    """
