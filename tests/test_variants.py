"""The variants as the design reads (docs/decisions.md, "Variants as the design reads"): every parameter
trains, α_t depends on t, residual carries the position component once, resampling resets a revived
feature whole, and the position-weighting ablation's pair. Each check is shown to flag a planted fault.
"""

import copy
import dataclasses

import pytest
import torch

from posae import train
from posae.checks import load_config
from posae.config import Config, SAEConfig, TrainConfig
from posae.saes import REGISTRY, SAE, build, variant_config
from posae.saes.fused import HierarchicalEncode
from posae.saes.hierarchical import Hierarchical

pytestmark = pytest.mark.usefixtures("one_thread")

# The default run's shapes: d = 640, k = 640, T = 128.
REAL_D, REAL_T, REAL_B = 640, 128, 256


@pytest.fixture(scope="module")
def default_cfg() -> Config:
    return load_config("default", check_model=False)


def real_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """256 tokens at mixed positions 1..127 (BOS excluded, as stored), unit scale per dimension."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(REAL_B, REAL_D, generator=g), torch.randint(1, REAL_T, (REAL_B,), generator=g)


def real_sae(cfg: Config, name: str, seed: int = 0) -> tuple[SAE, Config]:
    vcfg = variant_config(cfg, name)
    return build(name, REAL_D, vcfg.sae, REAL_T, seed=seed), vcfg


# --------------------------------------------------------------------------- every parameter trains


def params_without_gradient(sae: SAE, tcfg: TrainConfig) -> list[str]:
    """Names of parameters the training objective (at full λ1) gives no non-zero gradient on a real-shaped batch."""
    x_BD, pos_B = real_batch()
    sae.zero_grad(set_to_none=True)
    terms, _, _ = train.objective(sae(x_BD, pos_B), x_BD, pos_B, tcfg, tcfg.steps - 1, REAL_T)
    terms["total"].backward()
    return [n for n, p in sae.named_parameters() if p.grad is None or not bool(p.grad.ne(0).any())]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_parameter_receives_a_gradient(name, default_cfg):
    sae, vcfg = real_sae(default_cfg, name)
    assert sae.d_model == sae.k == 640 and sae.seq_len == 128
    assert params_without_gradient(sae, vcfg.train) == []


def test_the_gradient_check_flags_a_parameter_whose_gradient_is_dropped(default_cfg, monkeypatch):
    # The fault a hand-written backward can plant: the gate's gradient comes back as zeros.
    backward = HierarchicalEncode.backward

    def dropping_the_gate(ctx, *grads):
        *rest, grad_gate = backward(ctx, *grads)
        return (*rest, torch.zeros_like(grad_gate))

    monkeypatch.setattr(HierarchicalEncode, "backward", staticmethod(dropping_the_gate))
    sae, vcfg = real_sae(default_cfg, "hierarchical")
    assert params_without_gradient(sae, vcfg.train) == ["gate_logits_TP"]


# --------------------------------------------------------------------------- α_t depends on t

ROUTED = [n for n in sorted(REGISTRY) if getattr(REGISTRY[n], "use_attention", False)]


def naive_alpha(sae: Hierarchical, x_D: torch.Tensor, t: int, queries_see_position: bool = True) -> torch.Tensor:
    """α_t written out per head: softmax(q_h K_hᵀ / √E) V_h, concatenated, times W_o; [P]."""
    H, E = sae.cfg.heads, sae.cfg.head_dim
    p_TD = sae.position_table()
    q_X = (x_D - sae.b_dec_D + (p_TD[t] if queries_see_position else 0)) @ sae.W_q_DX
    k_TX, v_TX = p_TD @ sae.W_k_DX, p_TD @ sae.W_v_DX
    heads = [torch.softmax(q_X[h * E:(h + 1) * E] @ k_TX[:, h * E:(h + 1) * E].T / E**0.5, dim=-1)
             @ v_TX[:, h * E:(h + 1) * E] for h in range(H)]
    return torch.cat(heads) @ sae.W_o_XP


def spread_over_positions(alpha_TP: torch.Tensor) -> float:
    """How much α changes across positions for one token, relative to its size."""
    return float((alpha_TP - alpha_TP[:1]).abs().max() / alpha_TP.abs().mean())


@pytest.mark.parametrize("name", ROUTED)
def test_alpha_depends_on_the_position_for_a_fixed_token(name, default_cfg):
    sae, _ = real_sae(default_cfg, name)
    with torch.no_grad():
        sae.b_dec_D.normal_(generator=torch.Generator().manual_seed(1))  # b_d's place in the queries is checked too
        x_D = torch.randn(REAL_D, generator=torch.Generator().manual_seed(2))
        pos_T = torch.arange(REAL_T)
        alpha_TP = sae.route(x_D.expand(REAL_T, -1), pos_T, sae.position_table())
        want_TP = torch.stack([naive_alpha(sae, x_D, t) for t in range(REAL_T)])
        old_TP = torch.stack([naive_alpha(sae, x_D, t, queries_see_position=False) for t in range(REAL_T)])
    torch.testing.assert_close(alpha_TP, want_TP, rtol=1e-4, atol=1e-5)  # the fast path is the formula
    assert spread_over_positions(alpha_TP) > 0.01  # ~0.045 at initialisation (p_t has std 0.1)
    assert spread_over_positions(old_TP) < 1e-5  # queries from x alone: one α for every position


# --------------------------------------------------------------------------- residual: the position component once


def test_residual_position_features_see_no_r_t_and_the_reconstruction_gets_it_once(default_cfg):
    sae, _ = real_sae(default_cfg, "residual")
    x_BD, pos_B = real_batch()
    other_B = (pos_B + 17) % REAL_T
    with torch.no_grad():
        sae.pos_embed_TD.normal_(std=3.0, generator=torch.Generator().manual_seed(1))  # an r_t that would show
        f_BK = sae.encode(x_BD, pos_B)
        P = sae.groups["position"]
        want_BP = torch.relu((x_BD - sae.b_dec_D) @ sae.W_enc_DK[:, P.start:P.stop] + sae.b_enc_K[P.start:P.stop])
        torch.testing.assert_close(f_BK[:, P.start:P.stop], want_BP, rtol=1e-4, atol=1e-4)
        assert torch.equal(sae.encode(x_BD, other_B), f_BK)  # no input of the encoder depends on t
        x_hat_BD = sae.decode(f_BK, pos_B)
        torch.testing.assert_close(x_hat_BD - sae.decode(f_BK, other_B),
                                   sae.pos_embed_TD[pos_B] - sae.pos_embed_TD[other_B], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x_hat_BD, f_BK @ sae.W_dec_KD + sae.b_dec_D + sae.pos_embed_TD[pos_B])


def test_the_position_input_check_flags_an_encoder_that_sees_the_position(default_cfg):
    """The negative control of the test above: hierarchical's position features do read p_t."""
    sae, _ = real_sae(default_cfg, "hierarchical")
    x_BD, pos_B = real_batch()
    with torch.no_grad():
        assert not torch.equal(sae.encode(x_BD, (pos_B + 17) % REAL_T), sae.encode(x_BD, pos_B))


# --------------------------------------------------------------------------- resampling resets a feature whole

# Small shapes, every size distinct (D, k, P, T, heads x width, multiscale's ⌈T/s⌉ rows), so that an axis
# of size k or P is a per-feature axis and nothing else is.
D, T = 20, 16
SMALL_SAE = SAEConfig(expansion=3.0, buckets=4, heads=2, head_dim=6)  # k = 60, P = 30, X = 12
K, P = 60, 30
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state (its "step" is one count per parameter)


def per_feature_axes(param: torch.Tensor) -> list[tuple[int, range]]:
    """Axes of size k (every feature) or P (the position group), found from the shapes alone."""
    return [(a, range(K) if n == K else range(K - P, K)) for a, n in enumerate(param.shape) if n in (K, P)]


def small_state(name: str) -> tuple[train.TrainState, TrainConfig]:
    """A started run after one optimizer step, then every parameter and moment moved at random, so that
    nothing equals its initial value or zero by accident."""
    cfg = variant_config(Config(name="test", sae=SMALL_SAE, train=TrainConfig(steps=10, batch_size=64, lr=1e-2,
                                                                              resample_after=0.1)), name)

    class Store:  # what `train.start` reads of an activation store
        d_model, seq_len = D, T

    state = train.start(cfg, name, 0, Store())
    assert state.sae.k == K
    g = torch.Generator().manual_seed(5)
    x_BD, pos_B = torch.randn(64, D, generator=g), torch.randint(0, T, (64,), generator=g)
    terms, _, _ = train.objective(state.sae(x_BD, pos_B), x_BD, pos_B, cfg.train, 0, T)
    terms["total"].backward()
    state.opt.step()
    with torch.no_grad():
        for p in state.sae.parameters():
            p.add_(torch.randn(p.shape, generator=g))
            for key in MOMENTS:
                state.opt.state[p][key].add_(torch.rand(p.shape, generator=g) + 0.1)
    return state, cfg.train


DEAD = torch.tensor([1, 7, K - P + 2, K - 1])  # two global features, two position features


def resample_problems(name: str, feature_params=None) -> list[str]:
    """Resample the DEAD features of a fresh small `name` run; what is wrong with the result, [] if nothing.

    With `feature_params`, the SAE's list of per-feature parameters is replaced by it (a planted fault).
    """
    state, tcfg = small_state(name)
    sae = state.sae
    if feature_params is not None:
        sae.feature_params = lambda: feature_params(sae)
    before = copy.deepcopy(sae)
    moments = {n: {k: v.clone() for k, v in state.opt.state[p].items()} for n, p in sae.named_parameters()}
    dead_K = torch.zeros(K, dtype=torch.bool)
    dead_K[DEAD] = True
    state.since_fired_K[dead_K] = train.resample_threshold(tcfg)
    g = torch.Generator().manual_seed(6)
    x_BD = torch.randn(64, D, generator=g)
    stats = train.StepStats(fired_K=~dead_K, x_BD=x_BD, x_hat_BD=torch.zeros_like(x_BD),
                            err_sq_B=x_BD.square().sum(-1))
    live_norm = float(before.W_enc_DK.detach()[:, ~dead_K].norm(dim=0).mean())
    assert train.maybe_resample(state, stats, tcfg, 0) == len(DEAD)

    problems = []
    for n, p in sae.named_parameters():
        now, was, init = p.detach(), before.get_parameter(n).detach(), state.initial.get_parameter(n).detach()
        m_now, m_was = state.opt.state[p], moments[n]
        axes = per_feature_axes(p)
        if not axes:
            if not torch.equal(now, was) or any(not torch.equal(m_now[k], m_was[k]) for k in m_was):
                problems.append(f"{n}: shared by every feature, but resampling changed it")
            continue
        for axis, features in axes:
            local = torch.tensor([j - features.start for j in DEAD.tolist() if j in features])
            live = torch.tensor([j for j in range(len(features)) if j not in local.tolist()])
            def live_slice(t):
                return t.index_select(axis, live)

            if not torch.equal(live_slice(now), live_slice(was)) or any(
                    not torch.equal(live_slice(m_now[k]), live_slice(m_was[k])) for k in MOMENTS):
                problems.append(f"{n}: a live feature's slice changed")
            if any(bool(m_now[k].index_select(axis, local).ne(0).any()) for k in MOMENTS):
                problems.append(f"{n}: a revived feature's AdamW moments are not zero")
            if n not in ("W_enc_DK", "W_dec_KD") and not torch.equal(now.index_select(axis, local),
                                                                     init.index_select(axis, local)):
                problems.append(f"{n}: a revived feature's slice is not its initial value")
    # The encoder and decoder follow the resampling rule: unit decoder rows toward high-loss inputs, the
    # encoder column the same direction at 0.2 x the live columns' mean norm.
    W_dec, W_enc = sae.W_dec_KD.detach()[DEAD], sae.W_enc_DK.detach()[:, DEAD].T
    if not torch.allclose(W_dec.norm(dim=-1), torch.ones(len(DEAD))) or torch.equal(W_dec, before.W_dec_KD[DEAD]):
        problems.append("W_dec_KD: revived rows are not new unit directions")
    if not torch.allclose(W_enc, W_dec * 0.2 * live_norm, atol=1e-6):
        problems.append("W_enc_DK: revived columns are not 0.2 x the live norm along the new decoder row")
    listed = {(n, axis, (r.start, r.stop)) for n, axis, r in sae.feature_params()}
    shapes = {(n, axis, (r.start, r.stop)) for n, p in sae.named_parameters() for axis, r in per_feature_axes(p)}
    if listed != shapes:
        problems.append(f"feature_params lists {sorted(listed ^ shapes)} unlike the shapes say")
    return problems


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_resampling_resets_every_per_feature_slice_and_its_moments(name):
    assert resample_problems(name) == []


def test_the_resampling_check_flags_a_parameter_left_out():
    """The negative control: a gate table forgotten by feature_params keeps its trained values and moments."""
    def without_gate(sae):
        return [f for f in Hierarchical.feature_params(sae) if f[0] != "gate_logits_TP"]

    problems = resample_problems("hierarchical", without_gate)
    assert problems and all(p.startswith("gate_logits_TP: a revived") or p.startswith("feature_params lists")
                            for p in problems), problems
    assert {"gate_logits_TP: a revived feature's AdamW moments are not zero",
            "gate_logits_TP: a revived feature's slice is not its initial value"} <= set(problems)


# --------------------------------------------------------------------------- the position-weighting ablation


def test_hierarchical_unweighted_is_hierarchical_without_the_loss_weights(default_cfg):
    weighted = variant_config(default_cfg, "hierarchical")
    unweighted = variant_config(default_cfg, "hierarchical_unweighted")
    assert weighted.train.position_weighted and not unweighted.train.position_weighted
    assert dataclasses.replace(unweighted.train, position_weighted=True) == weighted.train
    assert unweighted.sae == weighted.sae
    a = build("hierarchical", D, SMALL_SAE, T, seed=3)
    b = build("hierarchical_unweighted", D, SMALL_SAE, T, seed=3)
    assert isinstance(b, Hierarchical) and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[n], b.state_dict()[n]) for n in a.state_dict())  # same seed, same start
