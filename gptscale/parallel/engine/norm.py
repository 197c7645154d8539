"""The global gradient norm and clipping for fp32 without ZeRO (``config.owns_clipping``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _counted_in_norm(param: torch.nn.Parameter) -> bool:
    """Whether this rank adds ``param`` to the global norm, so that each weight counts exactly once."""
    if getattr(param, "ds_pipe_replicated", False):
        return False
    return getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0


def clip_with_norm(module: torch.nn.Module, max_norm: float, group) -> torch.Tensor:
    """Clip the gradients of ``module`` to ``max_norm`` (0: no clipping) by their global norm over the
    model-parallel ``group``; return that norm (before clipping), without waiting for the device."""
    params = [p for p in module.parameters() if p.grad is not None]
    squares = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None and _counted_in_norm(p)]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=params[0].device)
    dist.all_reduce(total, group=group)
    norm = total.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
