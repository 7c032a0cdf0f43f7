"""The SAE variants, one parametrised test per property: adding a variant to the registry adds its tests."""

import dataclasses

import numpy as np
import pytest
import torch

from posae.config import Config, ConfigError, SAEConfig
from posae.saes import REGISTRY, SAE, build, register, variant_config, variant_path
from posae.saes.contrastive import position_info_nce

pytestmark = pytest.mark.usefixtures("one_thread")

D, T, B = 32, 16, 96
SAE_CFG = SAEConfig(expansion=2.0, buckets=4, heads=2, head_dim=8)  # k = 64, 32 per group


def make(name: str, seed: int = 0) -> SAE:
    """The variant as the config would build it: its params/variants YAML applied to small shapes."""
    cfg = variant_config(Config(sae=SAE_CFG), name)
    return build(name, D, cfg.sae, T, seed=seed)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randint(0, T, (B,), generator=g)


def test_all_ten_variants_of_the_spec_are_registered():
    assert {"baseline", "position_masking", "soft_masking", "soft_masking_sparse", "position_weighted",
            "attention_routing", "residual", "hierarchical", "contrastive", "multiscale"} <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_shapes_and_non_negative_features(name):
    sae = make(name)
    x_BD, pos_B = batch()
    out = sae(x_BD, pos_B)
    assert out.x_hat.shape == (B, D) and out.features.shape == (B, sae.k) == (B, 64)
    assert (out.features >= 0).all()
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.aux_losses.values())
    groups = sae.probe_groups()
    assert sorted([*groups["global"], *groups["position"]]) == list(range(sae.k))
    assert sae.groups is None or sae.groups == groups


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_forward_equals_decode_of_encode(name):
    sae = make(name)
    x_BD, pos_B = batch()
    out = sae(x_BD, pos_B)
    f_BK = sae.encode(x_BD, pos_B)
    torch.testing.assert_close(out.features, f_BK)
    torch.testing.assert_close(out.x_hat, sae.decode(f_BK, pos_B))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_same_seed_same_initialisation(name):
    a, b, c = make(name, seed=3), make(name, seed=3), make(name, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.W_dec_KD, c.W_dec_KD)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_tied_initialisation_and_unit_decoder(name):
    sae = make(name)
    torch.testing.assert_close(sae.W_dec_KD.norm(dim=-1), torch.ones(sae.k))
    torch.testing.assert_close(sae.W_enc_DK, sae.W_dec_KD.T)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_parallel_gradient_removed(name):
    sae = make(name)
    sae.W_dec_KD.grad = torch.randn_like(sae.W_dec_KD)
    sae.remove_parallel_grads_()
    parallel_K = (sae.W_dec_KD.grad * sae.W_dec_KD).sum(-1)
    torch.testing.assert_close(parallel_K, torch.zeros(sae.k), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_pre_encoder_bias_is_subtracted(name):
    """Shifting the input and b_dec together leaves the features unchanged (docs/decisions.md §9)."""
    sae = make(name)
    x_BD, pos_B = batch()
    shift_D = torch.randn(D)
    f_BK = sae.encode(x_BD, pos_B)
    with torch.no_grad():
        sae.b_dec_D += shift_D
    torch.testing.assert_close(sae.encode(x_BD + shift_D, pos_B), f_BK, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_gates_lie_in_unit_interval(name):
    sae = make(name)
    with torch.no_grad():
        for n, p in sae.named_parameters():
            if "gate" in n or "mask" in n:
                p.copy_(torch.randn_like(p) * 30)  # saturate: the bounds must still hold
    _, pos_B = batch()
    g_BP = sae.gates(pos_B)
    if g_BP is None:
        return
    assert g_BP.shape == (B, len(sae.probe_groups()["position"]))
    assert (g_BP >= 0).all() and (g_BP <= 1).all()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_autocast_bf16_forward_stays_close(name):
    sae = make(name)
    x_BD, pos_B = batch()
    ref = sae(x_BD, pos_B).x_hat
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sae(x_BD.to(torch.bfloat16), pos_B).x_hat.float()
    assert (low - ref).norm() / ref.norm() < 0.05


def test_position_masking_fires_only_the_bucket_of_t():
    from posae.saes.buckets import position_bucket

    sae = make("position_masking")
    with torch.no_grad():
        sae.b_enc_K.fill_(100.0)  # every feature would fire without its mask
    pos_B = torch.arange(T).repeat(4)
    f_BK = sae.encode(torch.randn(len(pos_B), D), pos_B)
    G = sae.groups["position"]
    f_p_BP = f_BK[:, G.start : G.stop]
    P, buckets = len(G), SAE_CFG.buckets
    feature_bucket_P = torch.arange(P) * buckets // P
    token_bucket_B = torch.from_numpy(position_bucket(pos_B.numpy(), T, buckets))
    allowed_BP = feature_bucket_P[None, :] == token_bucket_B[:, None]
    assert (f_p_BP[~allowed_BP] == 0).all()
    assert (f_p_BP[allowed_BP] > 0).all()
    assert (f_BK[:, : G.start] > 0).all()  # global features are not masked


def test_residual_variant_adds_the_position_embedding_to_the_reconstruction():
    sae = make("residual")
    f_BK = torch.zeros(T, sae.k)
    pos_B = torch.arange(T)
    torch.testing.assert_close(sae.decode(f_BK, pos_B), sae.b_dec_D + sae.position_table())


def test_multiscale_position_table_sums_the_scales():
    sae = make("multiscale")
    t = 13
    want = sum(sae.pos_embed[f"s{s}"][t // s] for s in (1, 4, 16))
    torch.testing.assert_close(sae.position_table()[t], want)


def test_info_nce_is_lower_for_aligned_than_shuffled_positions():
    g = torch.Generator().manual_seed(0)
    pos_B = torch.arange(T).repeat(16)
    proto_TP = torch.rand(T, 32, generator=g)
    z_BP = proto_TP[pos_B] + 0.3 * torch.rand(len(pos_B), 32, generator=g)
    shuffled_B = pos_B[torch.randperm(len(pos_B), generator=g)]
    aligned, shuffled = (position_info_nce(z_BP, p, T, 0.1) for p in (pos_B, shuffled_B))
    assert aligned < shuffled - 0.5
    assert abs(float(shuffled) - np.log(T)) < 0.5  # chance level


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if "contrastive" in make(n)(*batch()).aux_losses])
def test_contrastive_variant_loss_lower_for_aligned_positions(name):
    sae = make(name)
    g = torch.Generator().manual_seed(1)
    pos_B = torch.arange(T).repeat(12)
    # Activations that carry their position strongly, as the residual stream does.
    x_BD = 3 * torch.randn(T, D, generator=g)[pos_B] + 0.3 * torch.randn(len(pos_B), D, generator=g)
    aligned = sae(x_BD, pos_B).aux_losses["contrastive"]
    shuffled_B = pos_B[torch.randperm(len(pos_B), generator=g)]
    shuffled = sae(x_BD, shuffled_B).aux_losses["contrastive"]
    assert aligned < shuffled


def test_info_nce_skips_positions_without_a_positive():
    z_BP = torch.rand(4, 8)
    loss = position_info_nce(z_BP, torch.tensor([0, 1, 2, 3]), 4, 0.1)
    assert float(loss) == 0.0
    z_BP.requires_grad_(True)
    position_info_nce(z_BP, torch.tensor([0, 0, 1, 2]), 4, 0.1).backward()
    assert torch.isfinite(z_BP.grad).all()


# --------------------------------------------------------------------------- registry and options


def test_register_rejects_a_second_class_under_one_name():
    with pytest.raises(ValueError, match="registered twice"):
        @register("baseline")
        class Impostor(SAE):
            pass


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ConfigError, match="contrastive") as err:
        build("nonesuch", D, SAE_CFG, T)
    assert "nonesuch" in str(err.value) and "Fix" in str(err.value)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_variant_file_validates_and_holds_only_sae_and_train(name):
    cfg = variant_config(Config(), name)
    assert dataclasses.is_dataclass(REGISTRY[name].Options)
    assert set(cfg.sae.options) <= {f.name for f in dataclasses.fields(REGISTRY[name].Options)}


def test_unknown_option_names_file_key_and_fix():
    cfg = Config(sae=dataclasses.replace(SAEConfig(), options={"contrastive": {"temprature": 0.2}}))
    with pytest.raises(ConfigError) as err:
        variant_config(cfg, "contrastive")
    msg = str(err.value)
    assert str(variant_path("contrastive")) in msg and "temprature" in msg and "Fix" in msg


def test_run_config_options_override_the_variant_file():
    cfg = Config(sae=dataclasses.replace(SAEConfig(), options={"contrastive": {"temperature": 0.25}}))
    assert variant_config(cfg, "contrastive").sae.options["temperature"] == 0.25


def test_soft_masking_lambdas_are_multipliers_of_the_configs():
    assert variant_config(Config(), "soft_masking").train.l1_scale == 0.4
    assert variant_config(Config(), "soft_masking_sparse").train.l1_scale == 2.0
    assert variant_config(Config(), "position_weighted").train.position_weighted
    assert not variant_config(Config(), "baseline").train.position_weighted


# --------------------------------------------------------------------------- the decoder's Function


def decoder_gradients(sae: SAE, f_BK: torch.Tensor, fused: bool) -> list[torch.Tensor]:
    """x̂, the totals, and the gradients of f, W_dec and b_dec for a loss on both (as the objective's L1)."""
    f_BK = f_BK.detach().requires_grad_()
    if fused:
        x_hat_BD, totals_K = sae.reconstruct(f_BK, None)
    else:
        x_hat_BD, totals_K = torch.addmm(sae.b_dec_D, f_BK, sae.W_dec_KD), f_BK.sum(0)
    w_BD = torch.randn(x_hat_BD.shape, generator=torch.Generator().manual_seed(4), dtype=x_hat_BD.dtype)
    loss = (x_hat_BD * w_BD).sum() + 0.3 * totals_K.sum() + (totals_K**2).sum()
    return [x_hat_BD, totals_K, *torch.autograd.grad(loss, [f_BK, sae.W_dec_KD, sae.b_dec_D])]


def test_the_decoders_function_gives_autograds_numbers_and_gradients():
    sae = make("baseline").double()
    f_BK = torch.rand(B, sae.k, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for got, want in zip(decoder_gradients(sae, f_BK, fused=True), decoder_gradients(sae, f_BK, fused=False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    W, b = sae.W_dec_KD.detach()[:5, :4].clone().requires_grad_(), sae.b_dec_D.detach()[:4].clone().requires_grad_()
    f = torch.rand(7, 5, dtype=torch.float64, requires_grad=True)
    from posae.saes.base import _Decode
    assert torch.autograd.gradcheck(_Decode.apply, (f, W, b))


def test_a_variant_that_redefines_decode_gets_its_own_reconstruction():
    sae = make("residual")
    x_BD, pos_B = batch()
    out = sae(x_BD, pos_B)
    torch.testing.assert_close(out.x_hat, sae.decode(out.features, pos_B))
    assert not torch.allclose(out.x_hat, torch.addmm(sae.b_dec_D, out.features, sae.W_dec_KD))  # r_t is in it
    torch.testing.assert_close(out.totals, out.features.sum(0))


@pytest.mark.parametrize("relu", [False, True])
def test_linear_in_bf16_is_addmm_and_relu_to_the_bit(relu):
    # bf16 on a CPU goes through oneDNN's fused epilogue; it must be the plain ops' numbers, not close to them.
    from posae.saes.base import linear
    g = torch.Generator().manual_seed(6)
    x, W, b = (torch.randn(*s, generator=g).bfloat16() for s in ((300, 64), (64, 48), (48,)))
    want = torch.addmm(b, x, W)
    want = want.relu() if relu else want
    got = linear(x, W, b, relu)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert not torch.equal(linear(x, W, b, not relu), want)  # the flag is honoured
    torch.backends.mkldnn.enabled = False  # the plain ops' path
    try:
        assert torch.equal(linear(x, W, b, relu), want)
    finally:
        torch.backends.mkldnn.enabled = True


def test_plus_product_in_bf16_is_addmm_to_the_bit():
    from posae.saes.base import plus_product
    g = torch.Generator().manual_seed(8)
    y, x, W = (torch.randn(*s, generator=g).bfloat16() for s in ((300, 48), (300, 64), (64, 48)))
    assert torch.equal(plus_product(y, x, W), torch.addmm(y, x, W))


def test_under_bf16_autocast_a_relu_encoders_gradients_are_autograds():
    sae = make("baseline")
    x_BD, _ = batch()
    x_BD = x_BD.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_BK = sae.pre_acts(x_BD, relu=True)
        plain_BK = torch.relu(torch.addmm(sae.b_enc_K - sae.b_dec_D @ sae.W_enc_DK, x_BD, sae.W_enc_DK))
    assert torch.equal(f_BK, plain_BK.to(f_BK.dtype))
    w_BK = torch.randn(f_BK.shape, generator=torch.Generator().manual_seed(7)).bfloat16()
    got = torch.autograd.grad((f_BK * w_BK).float().sum(), [sae.W_enc_DK, sae.b_enc_K, sae.b_dec_D])
    want = torch.autograd.grad((plain_BK * w_BK).float().sum(), [sae.W_enc_DK, sae.b_enc_K, sae.b_dec_D])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_unit_rows_are_f_normalize_with_its_gradient_including_an_all_zero_row():
    import torch.nn.functional as F
    from posae.saes.contrastive import _UnitRows
    z = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    z[2] = 0.0  # the norm is clamped to ε there, as in F.normalize
    w = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    got_z, want_z = z.clone().requires_grad_(), z.clone().requires_grad_()
    got, want = _UnitRows.apply(got_z), F.normalize(want_z, dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(got_z.grad, want_z.grad, rtol=1e-9, atol=1e-9)
