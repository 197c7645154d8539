"""What the routers did in a step: their auxiliary losses, and how evenly tokens spread over the experts.

megatron-core records each MoE layer's load-balancing loss and z-loss (before their coefficients) in a
module-level tracker, summed over the micro-batches a rank runs; the step reads and clears it. Expert load
comes from the token counts ``gptscale.model.moe`` keeps per router. A collapsing router shows as a
``max_load`` far above 1 (one expert takes many times its fair share) long before the loss suffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils

from gptscale.config.layout import Layout
from gptscale.config.schema import ModelConfig, is_moe_layer
from gptscale.model.moe import read_routed_tokens

LOSSES = ("load_balancing_loss", "z_loss")


def _tracker() -> dict:
    """megatron-core's per-layer aux-loss tracker (a function in 0.16, a class in later releases)."""
    if hasattr(moe_utils, "get_moe_layer_wise_logging_tracker"):
        return moe_utils.get_moe_layer_wise_logging_tracker()
    return moe_utils.MoEAuxLossTracker.get_instance().tracker  # pragma: no cover - megatron-core > 0.16


def clear_tracker() -> None:
    for entry in _tracker().values():
        entry["values"].zero_()


def aux_losses(model: ModelConfig, layout: Layout, device: torch.device) -> dict[str, torch.Tensor]:
    """Per layer, each router loss averaged over the global batch's micro-batches (unweighted); a collective.

    Summed over all ranks: pipeline stages hold different layers, data-parallel ranks other micro-batches,
    and tensor- and context-parallel ranks parts of the load-balancing loss (its sum) or of the z-loss (its
    mean).
    """
    tracker = _tracker()
    values = torch.zeros(len(LOSSES), model.num_layers, device=device)
    for row, name in enumerate(LOSSES):
        if name in tracker:
            values[row] = tracker[name]["values"][: model.num_layers].float()
    clear_tracker()
    dist.all_reduce(values)
    values /= layout.num_microbatches * layout.dp
    values[LOSSES.index("z_loss")] /= layout.tp * layout.cp
    return dict(zip(LOSSES, values))


def weighted_aux_loss(model: ModelConfig, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The router losses as they enter the training objective: every MoE layer's, times its coefficient."""
    return (
        model.moe.aux_loss_coeff * losses["load_balancing_loss"].sum() + model.moe.z_loss_coeff * losses["z_loss"].sum()
    )


def router_metrics(model: ModelConfig, losses: dict[str, torch.Tensor], trainable: torch.nn.Module) -> dict:
    """Metrics for the trackers: mean losses over MoE layers, and per layer the max and min expert load
    (tokens per expert over their mean) since the previous call; ``tokens_per_expert`` is a list per layer.
    A collective (the load counts are summed over all ranks)."""
    layers = [i for i in range(model.num_layers) if is_moe_layer(model, i)]
    counts = read_routed_tokens(trainable, model.num_layers, model.moe.num_experts)[layers]
    load = counts / counts.mean(dim=1, keepdim=True).clamp(min=1e-9)
    metrics = {f"moe/{name}": losses[name][layers].mean().item() for name in LOSSES}
    metrics["moe/max_load"] = load.max().item()
    for row, layer in enumerate(layers):
        metrics[f"moe/layer{layer:02d}/max_load"] = load[row].max().item()
        metrics[f"moe/layer{layer:02d}/min_load"] = load[row].min().item()
    metrics["moe/tokens_per_expert"] = counts.round().int().tolist()
    return metrics
