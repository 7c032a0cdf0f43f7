"""AdamW on torch's fused kernel, without `torch.optim`'s import of the compiler.

`torch.optim.Optimizer.__init__` imports `torch._dynamo` (its methods are wrapped to disable the
compiler), which costs 1.5–3.5 s of CPU per process on this project's 2-core machines: once per
training notebook and per worker process, for an SAE step of 10–40 ms. This class calls the same
kernel `torch.optim.AdamW(fused=True)` calls, `torch._fused_adamw_`, with the same state layout
(``step``, ``exp_avg``, ``exp_avg_sq`` per parameter, created on the first step a parameter has a
gradient), so its updates are bit-identical to torch's (`tests/test_optim.py` checks that against
torch.optim.AdamW over many steps) and checkpoints keep their keys.

It implements what training uses: one parameter group whose ``lr`` may be set before each step,
`step`, `zero_grad`, and `state_dict` / `load_state_dict` with torch's index-keyed layout.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor


class AdamW:
    def __init__(self, params: Iterable[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        params = list(params)
        if not params:
            raise ValueError("AdamW got an empty parameter list")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: invalid lr {lr}, betas {betas}, eps {eps} or weight_decay {weight_decay}")
        self.param_groups: list[dict[str, Any]] = [
            {"params": params, "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}]
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p not in self.state:  # as torch: created on a parameter's first step with a gradient
                    self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            states = [self.state[p] for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=group["lr"],
                                beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                maximize=False, grad_scale=None, found_inf=None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: ``state`` keyed by the parameter's index, ``param_groups`` with the indices."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": {index[p]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = {}
        for i, s in sd["state"].items():
            p = params[int(i)]
            self.state[p] = {k: (v.to(device=p.device, dtype=torch.float32) if k == "step"
                                 else v.to(device=p.device, dtype=p.dtype).clone()) for k, v in s.items()}
        for g, saved in zip(self.param_groups, sd.get("param_groups", [])):
            g.update({k: v for k, v in saved.items() if k != "params"})
