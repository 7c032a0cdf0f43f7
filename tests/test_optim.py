"""posae.optim.AdamW against torch.optim.AdamW(fused=True): the same kernel, so the same bits."""

import torch

from posae.optim import AdamW


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(32, 16, generator=g)), torch.nn.Parameter(torch.randn(16, generator=g)),
            torch.nn.Parameter(torch.randn(8, 4, generator=g))]


def _run(opt_cls, steps: int = 25, **kw) -> tuple[list[torch.Tensor], object]:
    ps = _params(0)
    opt = opt_cls(ps, lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (1 - step / steps)
        for i, p in enumerate(ps):
            if i == 2 and step % 3 == 0:  # a parameter without a gradient on some steps is skipped, as in torch
                continue
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ps, opt


def test_bit_identical_to_torch_fused_adamw():
    ours, ours_opt = _run(AdamW)
    ref, ref_opt = _run(torch.optim.AdamW, fused=True)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for a, b in zip(ours, ref):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours_opt.state[a][key], ref_opt.state[b][key]), key


def test_the_learning_rate_set_before_each_step_is_used():
    # planted negative: another learning rate must change the result (the lr set per step is used)
    ours, _ = _run(AdamW)
    ps = _params(0)
    opt = AdamW(ps, lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for step in range(25):
        for i, p in enumerate(ps):
            if i == 2 and step % 3 == 0:
                continue
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad()
    assert not torch.equal(ours[0], ps[0])


def test_state_dict_round_trip_resumes_bit_identically():
    full, _ = _run(AdamW, steps=20)
    ps = _params(0)
    opt = AdamW(ps, lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        if step == 10:  # a fresh optimizer on copies of the parameters, from the state dict
            sd = opt.state_dict()
            ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
            opt2 = AdamW(ps2, lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01)
            opt2.load_state_dict(sd)
            ps, opt = ps2, opt2
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (1 - step / 20)
        for i, p in enumerate(ps):
            if i == 2 and step % 3 == 0:
                continue
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad()
    for a, b in zip(full, ps):
        assert torch.equal(a, b)
