"""Faster inference forwards for two of Gemma's modules, swapped in when a model loads (`speed_up`).

Capture's bfloat16 forward on the Intel Xeon with AMX spends more than half its time outside the
matmuls (benchmarks/README.md, "Capture"), in two places this module shortens:

- **RMSNorm** (Gemma, Gemma 2, Gemma 3) works in float32 through three fresh [tokens, d] tensors
  before the cast back. `InPlaceRMSNorm` runs the same operations in the same order on one float32
  copy, updated in place: the same bits, 23% less time per norm (1.00 -> 0.77 ms at 2,048 x 640).
- **The MLP's GELU** (Gemma 2, Gemma 3): torch's tanh-approximated GELU takes twice as long as the
  gate projection in front of it. `FusedGeluMLP` has oneDNN apply it to the gate projection's float32
  accumulator, inside the matmul, in bfloat16 only. The numbers are not the stock ones: the GELU sees
  the product before it is rounded to bfloat16 instead of after, one rounding fewer. Against the
  float32 model the activations are as close as the stock bfloat16 forward's (docs/models.md gives
  the cosines; tests/test_models.py holds the fused MLP to it).

Together they take 13-16% off capture's forward on that CPU (344 -> 288-300 ms per 16 x 128-token
batch in `benchmarks/profile_capture.py`) and 20% off the full 18-block forward (484 -> 389 ms).

A module's class is swapped for a subclass; weights, names, hooks and the state dict stay. Either forward
falls back to the stock one where it does not apply: autograd recording, another dtype or activation, a
bias, or a torch without oneDNN's fused linear.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F


class InPlaceRMSNorm:
    """Mixed into a Gemma RMSNorm: x · rsqrt(mean(x²) + ε) · (1 + w) in float32, cast back to x's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        out = x.to(torch.float32, copy=True)  # a copy even when x is float32: x itself must not change
        out.mul_(torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps))
        return out.mul_(1.0 + self.weight.float()).type_as(x)


class FusedGeluMLP:
    """Mixed into a Gemma MLP: down(GELU_tanh(gate x) ⊙ up x), the GELU fused into the gate's matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj
        if not _fusable(x, gate.weight, gate.bias, self.act_fn):
            return super().forward(x)
        fused = torch.ops.mkldnn._linear_pointwise(x, gate.weight, None, "gelu", [], "tanh")
        return self.down_proj(fused * self.up_proj(x))


def _fusable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: Any) -> bool:
    recording = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (HAS_FUSED_LINEAR and not recording and x.device.type == "cpu" and bias is None
            and x.dtype == weight.dtype == torch.bfloat16 and _is_tanh_gelu(act))


def _is_tanh_gelu(act: Any) -> bool:
    """transformers' GELUTanh (``gelu_pytorch_tanh``), which calls torch's GELU with approximate="tanh"."""
    fn = getattr(act, "act", None)
    return isinstance(fn, functools.partial) and fn.func is F.gelu and fn.keywords == {"approximate": "tanh"}


# oneDNN's matmul with a fused epilogue; posae.saes.base uses it too, for the SAE step's bf16 products.
HAS_FUSED_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# Stock classes whose forward the mixin reproduces, by module path and class name.
_SWAPS = {
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm"): InPlaceRMSNorm,
    ("transformers.models.gemma2.modeling_gemma2", "Gemma2RMSNorm"): InPlaceRMSNorm,  # params/paper.yaml's model
    ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm"): InPlaceRMSNorm,
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3MLP"): FusedGeluMLP,
    ("transformers.models.gemma2.modeling_gemma2", "Gemma2MLP"): FusedGeluMLP,
}
_SUBCLASSES: dict[type, type] = {}


def speed_up(model: Any) -> dict[str, int]:
    """Swap the faster forward in for every module of a class in `_SWAPS`; how many of each class."""
    swapped: dict[str, int] = {}
    for module in model.modules():
        cls = type(module)
        mixin = _SWAPS.get((cls.__module__, cls.__name__))
        if mixin is None:
            continue
        if cls not in _SUBCLASSES:
            _SUBCLASSES[cls] = type(cls.__name__, (mixin, cls), {"__module__": __name__, "__qualname__": cls.__name__})
        module.__class__ = _SUBCLASSES[cls]
        swapped[cls.__name__] = swapped.get(cls.__name__, 0) + 1
    return swapped
