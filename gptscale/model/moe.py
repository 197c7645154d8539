"""What gptscale adds around megatron-core's MoE layers: router settings, load counts, loss scale, expert bias.

megatron-core builds the router, token dispatcher and experts; this module reads and steers them from
outside, so the training step and the trainer need not know megatron-core's internals.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_updated_expert_bias
from megatron.core.transformer.moe.router import Router

EXPERT_MARKER = ".mlp.experts."
ROUTED_TOKENS = "routed_tokens"  # per router: tokens routed to each expert since the last read (top-k counted)


def provide_missing_te_gemm() -> None:
    """megatron-core 0.16's router GEMM tests ``te_general_gemm`` but only defines it when Transformer Engine
    imports; without it the name is missing, so it is defined as absent (torch's matmul is used)."""
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def routers(model: torch.nn.Module) -> list[Router]:
    return [module for module in model.modules() if isinstance(module, Router)]


def _count_routed_tokens(router: Router, inputs, outputs) -> None:
    if router.training and torch.is_grad_enabled():
        _, routing_map = outputs
        getattr(router, ROUTED_TOKENS).add_(routing_map.sum(dim=0).float())


def prepare_routers(model: torch.nn.Module) -> int:
    """Route aux losses the way gptscale's step weighs them, and count each router's load; returns how many.

    The step's main loss is already a per-token mean (the schedule passes it through unscaled), so the router's
    aux losses must not be multiplied by token counts as megatron-core does under ``calculate_per_token_loss``.
    """
    found = routers(model)
    for router in found:
        router.calculate_per_token_loss = False
        router.register_buffer(
            ROUTED_TOKENS, torch.zeros(router.config.num_moe_experts, device=router.weight.device), persistent=False
        )
        router.register_forward_hook(_count_routed_tokens)
    return len(found)


def set_aux_loss_scale(scale: float, device: torch.device) -> None:
    """Weight of the router losses' gradients, so that they count like a mean over the global batch's micro-batches."""
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([scale], device=device))


@torch.no_grad()
def update_expert_bias(model: torch.nn.Module) -> None:
    """Aux-loss-free balancing after an optimizer step: nudge each expert's bias towards an even load.

    Tokens per expert are summed over the tensor- and data-parallel ranks (megatron-core's rule), so every
    replica of a router takes the same step.
    """
    biased = [router for router in routers(model) if router.enable_expert_bias]
    if not biased:
        return
    tokens = torch.stack([router.local_tokens_per_expert for router in biased])
    biases = torch.stack([router.expert_bias for router in biased])
    updated = get_updated_expert_bias(tokens, biases, biased[0].config.moe_router_bias_update_rate)
    for router, bias in zip(biased, updated):
        router.expert_bias.copy_(bias)
        router.local_tokens_per_expert.zero_()


def expert_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of the routed experts (each expert-parallel rank holds different ones)."""
    return [param for name, param in model.named_parameters() if EXPERT_MARKER in name]


def read_routed_tokens(model: torch.nn.Module, num_layers: int, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert of each layer since the last read, summed over all ranks: [layers, experts].

    Layers without experts are zero. Tensor-parallel ranks route disjoint tokens (sequence parallelism), so
    the sum over all ranks counts every token once. A collective over all ranks; the counts restart from zero.
    """
    device = next(model.parameters()).device
    counts = torch.zeros(num_layers, num_experts, device=device)
    for router in routers(model):
        counts[router.layer_number - 1] += getattr(router, ROUTED_TOKENS)
        getattr(router, ROUTED_TOKENS).zero_()
    dist.all_reduce(counts)
    return counts
