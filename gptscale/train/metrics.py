"""Throughput figures: tokens/s, model TFLOP/s per device, MFU and peak memory.

Flops per token follow the PaLM paper's accounting: 6N for the weight matmuls (forward and backward) plus
12·L·H·Q·T for attention scores, with N the parameters that take part in matmuls (the output projection
counted, the embedding lookups not).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from gptscale.config.schema import ModelConfig, Precision, is_moe_layer

# Dense (no sparsity) peak TFLOP/s per device, by precision.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100 SXM": {"bf16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp32": 31.2},
    "V100": {"bf16": 125.0, "fp32": 15.7},
}


def matmul_parameters(model: ModelConfig, vocab_size: int) -> int:
    """Parameters that multiply activations: every layer's projections plus the output layer."""
    h, layers = model.hidden_size, model.num_layers
    head_dim = h // model.num_attention_heads
    groups = model.query_groups
    ffn = model.ffn_size
    attention = h * (model.num_attention_heads + 2 * groups) * head_dim + model.num_attention_heads * head_dim * h
    per_unit = 3 if model.activation.value == "swiglu" else 2
    mlp = h * ffn * per_unit
    moe = model.moe
    # A MoE layer's active weights: the router, the top-k experts a token visits and the shared expert.
    expert_ffn = model.expert_ffn_size
    active_moe = h * moe.num_experts + moe.top_k * h * expert_ffn * per_unit + h * moe.shared_expert_size * per_unit
    moe_layers = sum(is_moe_layer(model, i) for i in range(layers))
    return layers * attention + (layers - moe_layers) * mlp + moe_layers * active_moe + vocab_size * h


def flops_per_token(model: ModelConfig, vocab_size: int, seq_len: int) -> float:
    attention_scores = 12 * model.num_layers * model.hidden_size * seq_len
    return 6 * matmul_parameters(model, vocab_size) + attention_scores


def device_peak_tflops(device: torch.device, precision: Precision) -> Optional[float]:
    """Peak TFLOP/s of ``device`` from the table, or None when it is not listed (CPUs among them)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision.value]
    return None


@dataclass
class Throughput:
    tokens_per_s: float
    tflops_per_device: float
    mfu: Optional[float]
    peak_memory_gib: Optional[float]


class ThroughputMeter:
    """Times the steps between two log lines; reads the clock only there, so steps run without host syncs."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int,
                 peak_tflops: Optional[float], device: torch.device):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.device = device
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._start, self._steps = time.perf_counter(), 0

    def step_done(self) -> None:
        self._steps += 1

    def read(self) -> Throughput:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self.tokens_per_step * self._steps / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        mfu = tflops / self.peak_tflops if self.peak_tflops else None
        memory = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        self._start, self._steps = time.perf_counter(), 0
        return Throughput(tokens_per_s, tflops, mfu, memory)
