"""A dictionary split into a global half and a position-specific half (shared by the two-group variants)."""

from __future__ import annotations

from torch import Tensor

from posae.config import SAEConfig
from posae.saes.base import SAE


class GroupedSAE(SAE):
    """Features [0, k/2) are global, [k/2, k) position-specific (the paper's f_g and f_p, eq. 5)."""

    def __init__(self, d_model, sae_cfg, seq_len, options, generator):
        super().__init__(d_model, sae_cfg, seq_len, options, generator)  # checks size_problem
        self.n_global = self.k // 2

    @classmethod
    def size_problem(cls, k: int, d_model: int, sae_cfg: SAEConfig) -> str | None:
        problem = super().size_problem(k, d_model, sae_cfg)
        if problem is None and k % 2:
            return (f"the dictionary size k = {k} must be even to split into a global and a position half. "
                    f"Fix: choose sae.expansion so that expansion x {d_model} is even")
        return problem

    @property
    def groups(self) -> dict[str, range]:
        return {"global": range(0, self.n_global), "position": range(self.n_global, self.k)}

    def split(self, f_BK: Tensor) -> tuple[Tensor, Tensor]:
        """(global [B, G], position [B, P]) views of a feature or pre-activation tensor.

        One `torch.split`, not two slices: its backward writes the [B, K] gradient once, where each
        slice's would fill a zero [B, K] tensor and autograd would then add the two.
        """
        f_g_BG, f_p_BP = f_BK.split([self.n_global, self.k - self.n_global], dim=1)
        return f_g_BG, f_p_BP
