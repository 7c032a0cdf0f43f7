"""soft_masking_sparse: soft masking with a stronger sparsity penalty (paper §6.1, "increased sparsity")."""

from __future__ import annotations

from posae.saes import register
from posae.saes.soft_masking import SoftMasking


@register("soft_masking_sparse")
class SoftMaskingSparse(SoftMasking):
    """Soft masking's architecture; the paper's λ1 = 0.2 against its main 0.1 is read as 2× the config's
    λ1 (docs/decisions.md §9): params/variants/soft_masking_sparse.yaml sets ``train.l1_scale: 2.0``."""
