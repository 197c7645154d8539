"""LayerNorm / RMSNorm that work under sequence parallelism.

megatron-core's torch-only norm refuses sequence parallelism because, with the sequence split over
tensor-parallel ranks, each rank sees only its share of the tokens and the norm's weight gradient is a
partial sum. We mark the parameters ``sequence_parallel`` (the attribute megatron-core uses for the same
purpose) and ``gptscale.parallel.sequence_parallel`` all-reduces their gradients over the TP group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig


class Norm(torch.nn.Module):
    """``config.normalization`` (LayerNorm or RMSNorm) over the last dimension, in fp32 for stability."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)  # megatron-core reads this mark

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if self.rms:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return F.layer_norm(x, shape, self.weight, self.bias, self.eps)
