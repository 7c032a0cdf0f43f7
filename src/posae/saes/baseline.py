"""baseline: the position-agnostic ReLU SAE with an L1 penalty (paper §6.1)."""

from __future__ import annotations

from posae.saes import register
from posae.saes.base import SAE


@register("baseline")
class Baseline(SAE):
    """f = ReLU(W_enc (x − b_dec) + b_enc), x̂ = W_dec f + b_dec; positions are ignored.

    One undivided dictionary: `groups` is None and probes use the arbitrary half split.
    """
