"""The hierarchical family's fused encoder (`posae.saes.fused`) against its plain-autograd definition
(`Hierarchical.reference_groups`): the same features and the same gradient of every parameter, in
float64 exactly up to rounding and under bf16 autocast within bf16's rounding; its backward against
finite differences; and a planted wrong gradient that the comparison must catch.
"""

import pytest
import torch

from posae.config import Config, SAEConfig
from posae.saes import REGISTRY, build, variant_config
from posae.saes.fused import HierarchicalEncode
from posae.saes.hierarchical import Hierarchical

pytestmark = pytest.mark.usefixtures("one_thread")

FUSED = sorted(n for n in REGISTRY if issubclass(REGISTRY[n], Hierarchical) and REGISTRY[n].fusable())
D, T, B = 16, 10, 60


def make(name: str, dtype: torch.dtype = torch.float64, d: int = D, t: int = T, seed: int = 1) -> Hierarchical:
    """The variant at small shapes with every parameter moved off its initialisation (a zero b_dec or a
    constant gate table would hide a wrong term of their gradients)."""
    cfg = variant_config(Config(sae=SAEConfig(expansion=1.5, heads=2, head_dim=3)), name)
    sae = build(name, d, cfg.sae, t, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    return sae


def batch(dtype: torch.dtype = torch.float64, b: int = B, d: int = D, t: int = T, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    pos_B = torch.randint(0, t, (b,), generator=g)
    pos_B[:3] = 0  # a position several tokens share
    return torch.randn(b, d, generator=g, dtype=dtype), pos_B


def gradients(sae: Hierarchical, x_BD: torch.Tensor, pos_B: torch.Tensor, fused: bool) -> dict[str, torch.Tensor]:
    """Features and the gradient of x and of every parameter, for a loss on f and (separately) on f_p."""
    x_BD = x_BD.detach().requires_grad_()
    if fused:
        f_BK, f_p_BP = sae.encode_with_position(x_BD, pos_B)
    else:
        f_g_BG, f_p_BP = sae.reference_groups(x_BD, pos_B)
        f_BK = torch.cat([f_g_BG, f_p_BP], dim=1)
    g = torch.Generator().manual_seed(3)
    w_BK = torch.randn(f_BK.shape, generator=g, dtype=torch.float64).to(f_BK.dtype)
    w_BP = torch.randn(f_p_BP.shape, generator=g, dtype=torch.float64).to(f_BK.dtype)
    loss = (f_BK.float() * w_BK).sum() + (f_p_BP.float() * w_BP).sum()
    names, tensors = zip(*[("x", x_BD), *sae.named_parameters()])
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return {"f": f_BK.detach(), **{n: g for n, g in zip(names, grads) if g is not None}}


def worst_mismatch(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[str, float]:
    """The tensor furthest from the reference: ‖got − want‖ / ‖want‖, its name and that error.

    A norm and not the largest element: in bf16 a feature near zero can round to either side of its
    ReLU in two orders of the same sums, and such a flip moves single elements of x's gradient by
    their whole size while every sum over tokens barely moves."""
    assert want.keys() == got.keys()
    errors = {n: float((got[n].double() - want[n].double()).norm() / want[n].double().norm().clamp_min(1e-30))
              for n in want}
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


@pytest.mark.parametrize("name", FUSED)
def test_the_fused_encoder_is_the_reference_in_float64(name):
    sae = make(name)
    x_BD, pos_B = batch()
    want, got = gradients(sae, x_BD, pos_B, fused=False), gradients(sae, x_BD, pos_B, fused=True)
    assert len(got) == 2 + sum(1 for _ in sae.parameters()) - 1  # f, x and every parameter but the decoder's
    assert worst_mismatch(want, got)[1] < 1e-12
    torch.testing.assert_close(sae.encode(x_BD, pos_B), want["f"], rtol=0, atol=1e-12)


def test_the_comparison_catches_a_gradient_one_part_in_a_thousand_off(monkeypatch):
    backward = HierarchicalEncode.backward

    def off(ctx, *grads):
        out = list(backward(ctx, *grads))
        out[10] = out[10] * 1.001  # W_k's gradient
        return tuple(out)

    sae = make("hierarchical")
    x_BD, pos_B = batch()
    want = gradients(sae, x_BD, pos_B, fused=False)
    monkeypatch.setattr(HierarchicalEncode, "backward", staticmethod(off))
    worst, error = worst_mismatch(want, gradients(sae, x_BD, pos_B, fused=True))
    assert worst == "W_k_DX" and error == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("name", ["hierarchical", "attention_routing"])
def test_the_hand_written_backward_matches_finite_differences(name):
    sae = make(name, d=8, t=4)
    x_BD, pos_B = batch(b=9, d=8, t=4)
    params = [p for n, p in sae.named_parameters() if n != "W_dec_KD"]
    gate = sae.gate_logits_TP if sae.use_gate else None
    attention = (sae.W_q_DX, sae.W_k_DX, sae.W_v_DX, sae.W_o_XP)

    def f(x, W, b_enc, b_dec, p, W_q, W_k, W_v, W_o, *gate_):
        f_BK, f_p_BP = HierarchicalEncode.apply(x, pos_B, sae.n_global, sae.cfg.heads, True, W, b_enc, b_dec, p,
                                                W_q, W_k, W_v, W_o, *(gate_ or (None,)))
        return f_BK, f_p_BP

    inputs = [x_BD.requires_grad_(), sae.W_enc_DK, sae.b_enc_K, sae.b_dec_D, sae.pos_embed_TD, *attention]
    inputs += [gate] if gate is not None else []
    assert len(inputs) == len(params) + 1
    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FUSED)
def test_under_bf16_autocast_the_fused_encoder_is_as_close_to_float64_as_the_reference(name):
    # The training dtype: the same bf16 products, rounded in another order. Against the float64 truth,
    # each fused gradient must be no further off than the reference's own bf16 gradient (they are 0.3-7% off).
    sae = make(name, dtype=torch.float32, d=64, t=32)
    x_BD, pos_B = batch(dtype=torch.float32, b=512, d=64, t=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = gradients(sae, x_BD.bfloat16(), pos_B, fused=False)
        fused = gradients(sae, x_BD.bfloat16(), pos_B, fused=True)
    assert fused["f"].dtype == torch.bfloat16 and fused["W_enc_DK"].dtype == torch.float32
    truth = gradients(sae.double(), x_BD.double(), pos_B, fused=False)
    for n in truth:
        off = {which: worst_mismatch({n: truth[n]}, {n: grads[n]})[1] for which, grads in
               (("reference", reference), ("fused", fused))}
        assert off["fused"] < 1.25 * off["reference"] + 1e-3, (n, off)


def test_a_float32_model_gives_float32_gradients_without_autocast():
    sae = make("hierarchical", dtype=torch.float32)
    x_BD, pos_B = batch(dtype=torch.float32)
    got = gradients(sae, x_BD, pos_B, fused=True)
    assert {g.dtype for g in got.values()} == {torch.float32}
    assert worst_mismatch(gradients(sae, x_BD, pos_B, fused=False), got)[1] < 1e-5


def test_residual_encodes_both_halves_as_a_plain_relu_of_its_reference():
    sae = make("residual")
    x_BD, pos_B = batch()
    torch.testing.assert_close(sae.encode(x_BD, pos_B), torch.cat(sae.reference_groups(x_BD, pos_B), dim=1))


def test_fused_are_the_five_variants_with_position_features_routed_or_gated():
    assert FUSED == ["attention_routing", "contrastive", "hierarchical", "hierarchical_unweighted", "multiscale"]


def test_a_subclass_that_redefines_a_fused_part_runs_its_own_definition():
    class DoubleRoute(REGISTRY["hierarchical"]):
        def route(self, x_BD, pos_B, p_TD):
            return 2 * super().route(x_BD, pos_B, p_TD)

    sae, plain = make("hierarchical"), make("hierarchical")
    sae.__class__ = DoubleRoute
    x_BD, pos_B = batch()
    assert not DoubleRoute.fusable() and REGISTRY["hierarchical"].fusable()
    f_BK = sae.encode(x_BD, pos_B)
    torch.testing.assert_close(f_BK, torch.cat(sae.reference_groups(x_BD, pos_B), dim=1))
    assert not torch.allclose(f_BK, plain.encode(x_BD, pos_B))  # the override changed the features
