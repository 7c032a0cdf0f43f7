"""The interface every SAE variant shares, and the plain ReLU SAE that all of them build on.

Every variant maps normalised activations to non-negative features and back, always given the
tokens' positions, so no caller branches on the architecture:

    f_BK = sae.encode(x_BD, pos_B)          x_hat_BD = sae.decode(f_BK, pos_B)
    out = sae(x_BD, pos_B)                  # ForwardOutput(x_hat, features, aux_losses, totals)

Shared choices (docs/decisions.md §9, "Centring"): the decoder bias is subtracted from the encoder's input, the
encoder starts as the decoder's transpose, and decoder rows (the dictionary's columns in the
paper's W_d) keep unit norm: `remove_parallel_grads_` before each optimizer step and
`normalise_decoder_` after it, as SAELens and dictionary_learning do. Features are non-negative in
every variant (ReLU, masks and gates in [0, 1]), so ‖f‖₁ is a plain sum.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posae.config import SAEConfig
from posae.data.kernels import HAS_FUSED_LINEAR


class ForwardOutput(NamedTuple):
    x_hat: Tensor  # [B, D] reconstruction on the normalised scale
    features: Tensor  # [B, K] non-negative feature activations
    aux_losses: dict[str, Tensor]  # the variant's extra loss terms, already weighted; added to the objective
    # [K] each feature's total over the batch, float32 and differentiable: the L1 term's sum (`SAE.reconstruct`).
    # None: the objective sums `features` itself.
    totals: Tensor | None = None


@dataclass(frozen=True)
class NoOptions:
    """This variant has no options of its own."""


class SAE(nn.Module):
    """A ReLU sparse autoencoder: f = ReLU(W_enc (x − b_dec) + b_enc), x̂ = W_dec f + b_dec.

    Subclasses override `encode` (and `decode` where the reconstruction itself depends on the
    position) and set `Options` to a frozen dataclass of their own settings.
    """

    name: ClassVar[str] = "?"  # set by @register
    Options: ClassVar[type] = NoOptions

    def __init__(self, d_model: int, sae_cfg: SAEConfig, seq_len: int, options: Any, generator: torch.Generator):
        """Build through `posae.saes.build`, which validates `options` and seeds `generator`."""
        super().__init__()
        self.d_model = d_model
        self.k = dictionary_size(sae_cfg.expansion, d_model)
        problem = self.size_problem(self.k, d_model, sae_cfg)
        if problem is not None:
            raise ValueError(f"{self.name}: {problem}")
        self.seq_len = seq_len
        self.cfg = sae_cfg
        self.options = options
        W_dec_KD = F.normalize(torch.randn(self.k, d_model, generator=generator), dim=-1)
        self.W_dec_KD = nn.Parameter(W_dec_KD)
        # Tied initialisation (docs/decisions.md §9): each feature starts by detecting its own decoder direction.
        # Contiguous, not a transposed view: a checkpoint reloads it contiguous, and the matmul kernel
        # (hence the rounding) depends on the layout, so a resumed run would drift from an uninterrupted one.
        self.W_enc_DK = nn.Parameter(W_dec_KD.T.contiguous())
        self.b_enc_K = nn.Parameter(torch.zeros(self.k))
        self.b_dec_D = nn.Parameter(torch.zeros(d_model))

    @classmethod
    def size_problem(cls, k: int, d_model: int, sae_cfg: SAEConfig) -> str | None:
        """Why this variant cannot be built with `k` features, ending in the fix; None when it can.

        Asked when a config loads (`posae.saes.check_variants`, so a bad sae.expansion stops before
        any capture) and by the constructor; a variant that splits its dictionary extends it.
        """
        if k < 2:
            return (f"k = {k} features is too few: probes and ablations split every dictionary into a global "
                    f"and a position half. Fix: raise sae.expansion to at least {2 / d_model:.3g} "
                    f"(k = expansion x d, d = {d_model})")
        return None

    # ------------------------------------------------------------------ the interface

    def encode(self, x_BD: Tensor, pos_B: Tensor) -> Tensor:
        return self.pre_acts(x_BD, relu=True)

    def decode(self, f_BK: Tensor, pos_B: Tensor) -> Tensor:
        return torch.addmm(self.b_dec_D, f_BK, self.W_dec_KD)

    def forward(self, x_BD: Tensor, pos_B: Tensor) -> ForwardOutput:
        f_BK = self.encode(x_BD, pos_B)
        x_hat_BD, totals_K = self.reconstruct(f_BK, pos_B)
        return ForwardOutput(x_hat_BD, f_BK, {}, totals_K)

    def reconstruct(self, f_BK: Tensor, pos_B: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂ [B, D], each feature's total over the batch [K]), both differentiable: what training needs.

        With `decode` as defined here one Function forms both (`_Decode`), and the totals' gradient (the
        L1 term's) joins f's gradient inside the decoder's product. A variant that redefines `decode` gets
        its own x̂, and its totals summed apart.
        """
        if type(self).decode is SAE.decode:
            return _Decode.apply(f_BK, self.W_dec_KD, self.b_dec_D)
        return self.decode(f_BK, pos_B), f_BK.sum(0).to(self.W_dec_KD.dtype)

    @property
    def groups(self) -> dict[str, range] | None:
        """Index ranges of the global and position-specific features; None for one undivided dictionary."""
        return None

    def probe_groups(self) -> dict[str, range]:
        """`groups`, or for an undivided dictionary an arbitrary split into first and second half.

        The half split exists so probes and ablations treat every variant alike; on such a
        variant it measures no disentanglement (docs/decisions.md §7), and `groups is None` says so.
        """
        if self.groups is not None:
            return self.groups
        half = self.k // 2
        return {"global": range(0, half), "position": range(half, self.k)}

    def gates(self, pos_B: Tensor, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The multiplier in [0, 1] on the position features at positions `pos_B`, [B, P]; None if ungated.

        Masks (hard or soft) and the hierarchical gate g_t are all gates in this sense, so
        ablations read the mean gate activation the same way for each.
        """
        return None

    def diagnostics(self) -> dict[str, float]:
        """Scalars worth logging during training (gate or mask means); keys without a namespace."""
        return {}

    def position_tables(self) -> dict[str, Tensor]:
        """The learned per-position tables by a short name (gate logits G, mask logits M, position
        embedding p_t): what the end of a run reports against its step budget (`posae.train.table_movement`).

        Each is a parameter itself (rows indexed by position, or by a coarser position), not a table
        derived from several, so its movement is bounded by the run's Σ lr_t element by element.
        """
        return {}

    # ------------------------------------------------------------------ building blocks

    def pre_acts(self, x_BD: Tensor, W_DK: Tensor | None = None, relu: bool = False) -> Tensor:
        """W_enc (x − b_dec) + b_enc, written as x W_enc + (b_enc − b_dec W_enc), in x's dtype.

        The rewrite is the same number, but the [B, D] gradient of the shifted input is never
        formed: b_dec's encoder-side gradient costs one [K]x[K, D] product instead of a full
        [B, K]x[K, D] matmul (a sixth of a training step). `W_DK` is W_enc already cast to x's dtype,
        for an encoder that multiplies by it again (one cast per step, one gradient to cast back). With
        `relu`, the ReLU of it: the features of a plain ReLU encoder, in the product's epilogue (`linear`).
        """
        W_DK = self.W_enc_DK.to(x_BD.dtype) if W_DK is None else W_DK
        return _PreActs.apply(x_BD, W_DK, self.W_enc_DK, self.b_enc_K, self.b_dec_D, relu)

    def feature_params(self) -> list[tuple[str, int, range]]:
        """(parameter name, feature axis, the features that axis indexes) of every per-feature parameter.

        Resampling (`posae.train.maybe_resample`) rewrites a revived feature's slice of each and zeroes
        the AdamW moments of exactly that slice. A parameter of the position group alone (a gate
        table [T, P]) names `range(n_global, k)`: its index j on the axis is feature n_global + j.
        """
        every = range(self.k)
        return [("W_enc_DK", 1, every), ("b_enc_K", 0, every), ("W_dec_KD", 0, every)]

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        self.W_dec_KD.div_(self.W_dec_KD.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Drop the part of each decoder row's gradient that would only change its norm."""
        W, G = self.W_dec_KD, self.W_dec_KD.grad
        if G is not None:
            G.addcmul_(torch.linalg.vecdot(G, W).unsqueeze(-1), W, value=-1)  # 3 passes over [K, D], not 4

    def extra_repr(self) -> str:
        return f"d={self.d_model}, k={self.k}, seq_len={self.seq_len}, options={self.options}"


def dictionary_size(expansion: float, d_model: int) -> int:
    """k = expansion x d, rounded (at least 1; `SAE.size_problem` says which k a variant can take)."""
    return max(1, round(expansion * d_model))


class _PreActs(torch.autograd.Function):
    """x W + (b_enc − b_dec W) with a hand-written backward (`SAE.pre_acts`).

    W_c is W cast to x's dtype. W's whole gradient, x^T g − b_dec ⊗ Σ_B g, is returned for W itself,
    in fp32 and none for W_c: x^T g is cast up once and the bias vector's share added to it in place
    as a rank-1 update, where autograd would cast it, build the rank-1 term as a new [D, K]
    tensor and add the two (~4% of a k = 640 step at 1,024 tokens). The same numbers up to rounding.
    """

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_c_DK: Tensor, W_DK: Tensor, b_enc_K: Tensor, b_dec_D: Tensor,
                relu: bool) -> Tensor:
        bias_K = (b_enc_K - vec_mat(b_dec_D, W_DK)).to(x_BD.dtype)
        with torch.autocast(x_BD.device.type, enabled=False):
            pre_BK = linear(x_BD, W_c_DK, bias_K, relu)
        ctx.save_for_backward(x_BD, W_c_DK, W_DK, b_dec_D, pre_BK if relu else None)
        return pre_BK

    @staticmethod
    def backward(ctx, g_BK: Tensor) -> tuple[Tensor | None, ...]:
        x_BD, W_c_DK, W_DK, b_dec_D, f_BK = ctx.saved_tensors
        if f_BK is not None:  # ReLU's backward, given its output
            g_BK = torch.ops.aten.threshold_backward(g_BK, f_BK, 0)
        g_K = g_BK.sum(0).to(W_DK.dtype)
        grad_x_BD = g_BK @ W_c_DK.T if ctx.needs_input_grad[0] else None
        grad_W_DK = torch.mm(x_BD.T, g_BK).to(W_DK.dtype).addr_(b_dec_D, g_K, alpha=-1)
        return grad_x_BD, None, grad_W_DK, g_K, -vec_mat(g_K, W_DK.T), None


def linear(x_BI: Tensor, W_IO: Tensor, b_O: Tensor, relu: bool = False) -> Tensor:
    """x W + b, or its ReLU, in x's dtype. For bf16 on a CPU, through oneDNN's matmul with the bias and
    the ReLU in its epilogue: addmm would first copy b into every row of the output, and the ReLU would be
    a pass of its own (together ~1 ms of a 4,096-token, k = 640 step). The same numbers: oneDNN runs
    the same bf16 product with fp32 accumulation either way."""
    if _onednn_bf16(x_BI):
        return torch.ops.mkldnn._linear_pointwise(x_BI, W_IO.T, b_O, "relu" if relu else "none", [], "")
    out_BO = torch.addmm(b_O, x_BI, W_IO)
    return out_BO.relu_() if relu else out_BO


def _onednn_bf16(x: Tensor) -> bool:
    """Whether x's products can run through oneDNN's fused-epilogue matmul: bf16 on a CPU, oneDNN present
    and enabled (`torch.backends.mkldnn.enabled = False` turns this path off)."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and HAS_FUSED_LINEAR
            and torch.backends.mkldnn.enabled)


def plus_product(y_BO: Tensor, x_BI: Tensor, W_IO: Tensor) -> Tensor:
    """y + x W in one op: for bf16 on a CPU with the sum in oneDNN's epilogue, where addmm would copy y
    into its output first. The same numbers."""
    if _onednn_bf16(x_BI):
        return torch.ops.mkldnn._linear_pointwise.binary(x_BI, y_BO, W_IO.T, None, "add")
    return torch.addmm(y_BO, x_BI, W_IO)


class _Decode(torch.autograd.Function):
    """(x̂ = f W_dec + b_dec, totals = Σ_B f) with a hand-written backward (`SAE.reconstruct`).

    f's gradient is g_x̂ W_decᵀ plus the totals' gradient broadcast over the batch; here the second is
    the bias of the product that forms the first, where autograd would form the product and then add
    the broadcast in a pass of its own over [B, K]. The sum accumulates in fp32 and is rounded once to
    f's dtype, then widened: a bf16 [B, K] sum into fp32 takes 7x as long. The same numbers up to rounding.
    """

    @staticmethod
    def forward(ctx, f_BK: Tensor, W_KD: Tensor, b_D: Tensor) -> tuple[Tensor, Tensor]:
        c = f_BK.dtype
        with torch.autocast(f_BK.device.type, enabled=False):
            W_c_KD = W_KD.to(c)
            x_hat_BD = linear(f_BK, W_c_KD, b_D.to(c))
            totals_K = f_BK.sum(0).to(W_KD.dtype)
        ctx.save_for_backward(f_BK, W_c_KD)
        ctx.dtypes = W_KD.dtype, b_D.dtype
        return x_hat_BD, totals_K

    @staticmethod
    def backward(ctx, g_BD: Tensor | None, g_K: Tensor | None) -> tuple[Tensor | None, ...]:
        f_BK, W_c_KD = ctx.saved_tensors
        if g_BD is None:  # only the totals reach the loss
            return g_K.to(f_BK.dtype).expand_as(f_BK), None, None
        g_BD = g_BD.to(f_BK.dtype)
        g_f_BK = g_BD @ W_c_KD.T if g_K is None else linear(g_BD, W_c_KD.T, g_K.to(f_BK.dtype))
        grad_W_KD = torch.mm(f_BK.T, g_BD).to(ctx.dtypes[0]) if ctx.needs_input_grad[1] else None
        grad_b_D = g_BD.sum(0).to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        return g_f_BK, grad_W_KD, grad_b_D


def vec_mat(v_D: Tensor, W_DK: Tensor) -> Tensor:
    """v W in fp32 even under autocast: a one-row bf16 matmul costs oneDNN a weight reorder (~0.7 ms at
    640 x 640, 2% of a step) where the fp32 product takes microseconds."""
    wide = torch.promote_types(torch.promote_types(v_D.dtype, W_DK.dtype), torch.float32)
    with torch.autocast(v_D.device.type, enabled=False):
        return v_D.to(wide) @ W_DK.to(wide)


def options_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
