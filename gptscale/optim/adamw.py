"""torch's fused AdamW: one kernel per parameter group (CUDA and CPU), no C++ build at start-up."""

from __future__ import annotations

import torch

from gptscale.optim.kind import GatedStep, OptimizerKind


class AdamW(GatedStep, torch.optim.AdamW):
    pass


def build(optim, param_groups: list[dict], decide=None) -> AdamW:
    return AdamW(param_groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=True, decide=decide)


KIND = OptimizerKind("adamw", build, state=("exp_avg", "exp_avg_sq"), zero_stages=(0, 1, 2, 3))
