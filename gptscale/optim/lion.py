"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), from the paper.

Per element: ``c = beta1 * m + (1 - beta1) * g``; ``p = p - lr * (sign(c) + wd * p)`` (decoupled weight
decay); ``m = beta2 * m + (1 - beta2) * g``. Being elementwise, it is exact on ZeRO's flat partitions.
DeepSpeed's FusedLion and CPU Lion compile C++ at start-up; this one is torch ``_foreach`` ops.
"""

from __future__ import annotations

import torch

from gptscale.optim.kind import GatedStep, OptimizerKind


class LionUpdate(torch.optim.Optimizer):
    _step_supports_amp_scaling = True  # step() reads ``found_inf``

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            moments, steps = [s["exp_avg"] for s in states], [s["step"] for s in states]
            grads = [p.grad for p in params]
            keep = 1.0
            if found_inf is not None:
                # A skipped step sees its moment as the gradient: the moment stays exactly, the update is
                # scaled to zero, and a non-finite gradient never enters the arithmetic.
                skip = found_inf.to(torch.bool)
                grads = [torch.where(skip, m, g) for m, g in zip(moments, grads)]
                keep = 1.0 - found_inf.to(torch.float32)
            beta1, beta2 = group["betas"]
            lr, decay = group["lr"], group["weight_decay"]
            update = torch._foreach_lerp(moments, grads, 1.0 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_lerp_(moments, grads, 1.0 - beta2)
            torch._foreach_mul_(params, 1.0 - lr * decay * keep)
            torch._foreach_mul_(update, -lr * keep)
            torch._foreach_add_(params, update)
            torch._foreach_add_(steps, keep)
        return loss


class Lion(GatedStep, LionUpdate):
    pass


def build(optim, param_groups: list[dict], decide=None) -> Lion:
    return Lion(param_groups, lr=optim.lr, betas=tuple(optim.betas), decide=decide)


KIND = OptimizerKind("lion", build, state=("exp_avg",), zero_stages=(0, 1, 2, 3))
