"""DeepSpeed's JSON for a run, derived in this one place from gptscale's typed configs (nothing else builds or
passes DeepSpeed JSON), and the optimizer's parameter groups."""

from __future__ import annotations

import torch

from gptscale.config.layout import Layout
from gptscale.config.schema import OptimConfig, Precision, TrainConfig


def owns_clipping(layout: Layout, train: TrainConfig) -> bool:
    """fp32 without ZeRO: DeepSpeed's clipping there drops the norm and counts a tied embedding's pipeline copy
    twice, so the engine adapter clips itself (``norm.clip_with_norm``) and DeepSpeed is told not to."""
    return layout.zero == 0 and train.precision == Precision.fp32


def engine_config(layout: Layout, optim: OptimConfig, train: TrainConfig) -> dict:
    """DeepSpeed's JSON for this run.

    Without pipelining the engine runs the gradient-accumulation loop itself. With pipelining megatron-core's
    schedule runs every micro-batch, so the engine sees one (large) micro-batch per step.
    """
    accumulation = layout.num_microbatches if layout.pp == 1 else 1
    micro = layout.micro_batch * (layout.num_microbatches // accumulation)
    bf16 = train.precision == Precision.bf16
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * layout.expert_dp,
        "gradient_clipping": 0.0 if owns_clipping(layout, train) else optim.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": layout.zero,
            "contiguous_gradients": layout.pp == 1,
            "overlap_comm": False,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every forward and step by default, which
        # stops the host from queueing work ahead; gptscale measures throughput itself (train/metrics.py).
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if bf16 and layout.zero >= 1:
        # Sum micro-batch gradients in fp32 under bf16 weights (DeepSpeed's default sums in bf16). DeepSpeed
        # offers this only with ZeRO; without it, bf16 gradients accumulate in bf16.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm scales keep their scale (GPT-2/Megatron practice)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
